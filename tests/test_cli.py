"""`thinkwise generate` end to end, in a subprocess like a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinkwise", *args], capture_output=True, text=True, timeout=600)


def test_generate_json_with_counts(tiny_llama):
    directory, _ = tiny_llama
    result = run_cli("generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "5", "--n", "2",
                     "--temperature", "0.8", "--seed", "3", "--json", "hello")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["outputs"]) == 2
    assert all(len(o["token_ids"]) <= 5 for o in data["outputs"])
    counts = data["token_counts"]
    assert counts["prompt_tokens"] == len(data["prompt_token_ids"]) == 5
    assert counts["prompt_tokens_computed"] == 5
    assert counts["generated_tokens"] == sum(len(o["token_ids"]) for o in data["outputs"])


def test_generate_chat_plain_text(tiny_llama):
    directory, _ = tiny_llama
    result = run_cli("generate", "--model", str(directory), "--max-tokens", "4", "--chat", "hi")
    assert result.returncode == 0, result.stderr


def test_errors_are_one_line_not_tracebacks(tmp_path, tiny_llama):
    directory, _ = tiny_llama
    missing = run_cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    bad = run_cli("generate", "--model", str(directory), "--temperature", "-1", "hi")
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr
    bad_p = run_cli("generate", "--model", str(directory), "--top-p", "0", "hi")
    assert bad_p.returncode == 2 and "top_p" in bad_p.stderr
