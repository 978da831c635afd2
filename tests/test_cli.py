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


def test_solve_prints_answer_votes_and_cost(tiny_llama):
    directory, _ = tiny_llama
    result = run_cli("solve", "--model", str(directory), "--dtype", "float32", "--strategy", "short-m@k", "--k", "4",
                     "--m", "2", "--max-tokens", "8", "--seed", "1", "--raw", "--json", "what is 1+1?")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["strategy"] == "short-2@4" and len(data["samples"]) == 4
    assert data["cost"]["decode_tokens"] == sum(s["num_tokens"] for s in data["samples"])
    text = run_cli("solve", "--model", str(directory), "--strategy", "majority@k", "--k", "2", "--max-tokens", "4",
                   "--raw", "hi")
    assert text.returncode == 0, text.stderr
    assert "answer:" in text.stdout and "cost:" in text.stdout


def test_solve_rejects_unknown_strategy_before_loading(tmp_path):
    result = run_cli("solve", "--model", str(tmp_path / "missing"), "--strategy", "telepathy@3", "hi")
    assert result.returncode == 2 and "unknown strategy" in result.stderr


def test_bench_writes_its_files_and_pins_the_gemm_table(tiny_llama, tmp_path):
    import json

    from thinkwise.cli import main

    directory, _ = tiny_llama
    out = tmp_path / "bench"
    args = ["bench", "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--tasks", "sum:1",
            "--strategies", "greedy,majority@2", "--n-per-level", "1", "--max-tokens", "6", "--out", str(out)]
    assert main(args) == 0
    table = json.loads((out / "gemm_dispatch.json").read_text())
    assert table and all("x" in key for key in table)
    for name in ("results.jsonl", "summary.csv", "report.html", "accuracy_overview.png"):
        assert (out / name).exists()
    (out / "gemm_dispatch.json").write_text(json.dumps({key: None for key in table}))
    assert main(args) == 0  # resumes; the pinned table is what a rerun loads
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
