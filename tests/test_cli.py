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


def test_generate_chat_prints_the_chat_templated_completion(tiny_llama):
    """--chat wraps the prompt in the model's chat template: stdout is exactly what LLM.chat
    generates for the same message (and differs from the raw-prompt completion)."""
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    result = run_cli("generate", "--model", str(directory), "--max-tokens", "4", "--chat", "--no-stream", "hi")
    assert result.returncode == 0, result.stderr
    llm = LLM(str(directory))
    greedy = SamplingParams(temperature=0, max_tokens=4)
    chat = llm.chat([{"role": "user", "content": "hi"}], greedy)[0].outputs[0].text
    raw = llm.generate("hi", greedy)[0].outputs[0].text
    assert result.stdout.rstrip("\n") == chat
    assert chat != raw  # the template really changed the prompt the model saw


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


# ---------------------------------------------------------------------- streaming and output hygiene
def test_generate_streams_the_same_text_it_prints_without_streaming(tiny_llama):
    directory, _ = tiny_llama
    common = ["generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "12", "hello"]
    streamed, whole = run_cli(*common), run_cli(*common, "--no-stream")
    assert streamed.returncode == whole.returncode == 0, streamed.stderr + whole.stderr
    assert streamed.stdout == whole.stdout and streamed.stdout.strip()


def test_generate_labels_streamed_samples_and_json_is_one_line(tiny_llama):
    directory, _ = tiny_llama
    args = ["generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "6", "--n", "3",
            "--temperature", "0.9", "--seed", "2", "hi"]
    streamed = run_cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    lines = streamed.stdout.rstrip("\n").split("\n")  # random tokens may hold other line breaks
    assert all(line.startswith(("[0] ", "[1] ", "[2] ")) for line in lines)
    assert sum(1 for line in lines if " -- finished (" in line) == 3
    as_json = run_cli(*args, "--json")
    assert as_json.returncode == 0 and len(as_json.stdout.splitlines()) == 1
    data = json.loads(as_json.stdout)
    texts = {o["index"]: o["text"] for o in data["outputs"]}
    for i, text in texts.items():  # the streamed lines are the same samples' text
        assert "\n".join(l[4:] for l in lines if l.startswith(f"[{i}] ") and " -- finished" not in l) == text


def test_solve_keeps_stdout_for_the_answer_and_shows_samples_on_stderr(tiny_llama):
    directory, _ = tiny_llama
    result = run_cli("solve", "--model", str(directory), "--dtype", "float32", "--strategy", "majority@3",
                     "--max-tokens", "5", "--seed", "1", "--raw", "what is 1+1?")
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["answer", "votes", "samples", "cost"]
    assert "samples: 0 running, " in result.stderr and "[2] -- " in result.stderr
    quiet = run_cli("solve", "--model", str(directory), "--dtype", "float32", "--strategy", "majority@3",
                    "--max-tokens", "5", "--seed", "1", "--raw", "--no-stream", "--json", "what is 1+1?")
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 1
    assert json.loads(quiet.stdout)["strategy"] == "majority@3"
    assert "[0]" not in quiet.stderr


# ---------------------------------------------------------------------- mistakes found before loading
def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_mistakes_are_reported_before_the_model_is_read(tmp_path):
    # The model path does not exist, so each error below proves its check ran first.
    missing = str(tmp_path / "no-model")
    one_line_error(run_cli("generate", "--model", missing, "--device", "gpu", "hi"), "did you mean cuda")
    one_line_error(run_cli("generate", "--model", missing, "--block-size", "0", "hi"), "--block-size")
    one_line_error(run_cli("solve", "--model", missing, "--strategy", "best-of-8", "hi"), "--answer")
    one_line_error(run_cli("solve", "--model", missing, "--strategy", "majorty@8", "hi"), "did you mean majority@8")
    one_line_error(run_cli("bench", "--model", missing, "--tasks", "sequences:1", "--out", str(tmp_path / "b")),
                   "did you mean sequence")
    one_line_error(run_cli("serve", "--model", missing, "--port", "99999"), "--port 99999")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(run_cli("serve", "--model", missing, "--port", str(taken.getsockname()[1])), "in use")
    assert not (tmp_path / "b").exists()


def test_max_tokens_beyond_the_context_is_refused_before_the_weights_load(tiny_llama):
    directory, _ = tiny_llama
    one_line_error(run_cli("generate", "--model", str(directory), "--max-tokens", "40000", "hi"),
                   "context holds 512", "below 512")


def test_flags_and_commands_get_did_you_mean():
    one_line_error(run_cli("generate", "--max-tokns", "5", "hi"), "did you mean --max-tokens", "generate --help")
    one_line_error(run_cli("generat", "hi"), "did you mean generate")
    one_line_error(run_cli("solve", "--strategy", "greedy"), "required", "question")
    one_line_error(run_cli("generate", "--dtype", "fp8", "hi"), "--dtype")


def test_version_and_help_show_defaults_and_families():
    from thinkwise import __version__
    from thinkwise.tasks import FAMILIES

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"thinkwise {__version__}"
    for command, defaults in [("generate", ["(default: 256)", "(default: 0.0)", "(default: 1.0)"]),
                              ("solve", ["(default: majority@k)", "(default: 8)", "(default: 0.7)"]),
                              ("bench", ["(default: 20)", "(default: sum:2-4,hanoi:3-4)", "greedy,majority@8"])]:
        result = run_cli(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())  # help wraps long lines
        for default in defaults:
            assert default in text, (command, default)
    bench = run_cli("bench", "--help").stdout
    for name, family in FAMILIES.items():
        if name != "jsonl":
            assert f"  {name} " in bench and f"levels {family.min_level}-{family.max_level}" in bench


def test_every_option_has_help():
    import argparse

    from thinkwise.cli import _subparsers, build_parser

    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            assert action.help and action.help is not argparse.SUPPRESS, (name, action.option_strings)


def test_version_matches_the_package_metadata():
    import tomllib
    from pathlib import Path

    from thinkwise import __version__

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_generate_prints_what_was_made(tiny_llama, monkeypatch, capsys):
    from thinkwise.cli import main
    from thinkwise.engine.engine import Engine

    directory, _ = tiny_llama
    real_step, calls = Engine.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    args = ["generate", "--model", str(directory), "--dtype", "float32", "--max-tokens", "50", "--n", "2",
            "--temperature", "1", "--seed", "0", "hi"]
    assert main(args + ["--no-stream"]) == 130
    out = capsys.readouterr()
    assert "--- sample 0 (interrupted) ---" in out.out and "--- sample 1 (interrupted) ---" in out.out
    assert len(out.out.splitlines()) > 2 and "interrupted" in out.err
    calls.clear()
    assert main(args + ["--json"]) == 130
    data = json.loads(capsys.readouterr().out)
    assert data["interrupted"] and all(o["text"] and o["finish_reason"] is None for o in data["outputs"])


def test_ctrl_c_in_solve_prints_the_samples_so_far(tiny_llama, monkeypatch, capsys):
    from thinkwise.cli import main
    from thinkwise.cli_live import StrategyView

    directory, _ = tiny_llama
    real_update, calls = StrategyView.update, []

    def update(self, force=False):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_update(self, force)

    monkeypatch.setattr(StrategyView, "update", update)
    args = ["solve", "--model", str(directory), "--dtype", "float32", "--strategy", "majority@2", "--max-tokens", "40",
            "--raw", "--json", "hi"]
    assert main(args) == 130
    data = json.loads(capsys.readouterr().out)
    assert data["interrupted"] and len(data["samples"]) == 2 and any(s["text"] for s in data["samples"])


def test_reasoning_flags_are_checked_before_the_model_is_read(tmp_path):
    missing = str(tmp_path / "no-model")
    one_line_error(run_cli("generate", "--model", missing, "--reasoning-parser", "deepseek", "hi"),
                   "--reasoning-parser")
    one_line_error(run_cli("generate", "--model", missing, "--chat", "--chat-template-kwargs", "[1]", "hi"),
                   "--chat-template-kwargs", "JSON object")
    one_line_error(run_cli("generate", "--model", missing, "--chat", "--chat-template-kwargs",
                           '{"add_generation_prompt": false}', "hi"), "set by the server itself")
    one_line_error(run_cli("generate", "--model", missing, "--presence-penalty", "3", "hi"), "presence_penalty",
                   "[-2, 2]")
    one_line_error(run_cli("generate", "--model", missing, "--repetition-penalty", "0", "hi"), "repetition_penalty")
    one_line_error(run_cli("serve", "--model", missing, "--reasoning-effort-budgets", "low=lots"),
                   "--reasoning-effort-budgets")


def test_generate_with_reasoning_controls_reports_the_split(tiny_llama):
    directory, _ = tiny_llama
    result = run_cli("generate", "--model", str(directory), "--dtype", "float32", "--device", "cpu", "--chat",
                     "--max-tokens", "20", "--reasoning-parser", "deepseek_r1", "--reasoning-effort", "low",
                     "--reasoning-effort-budgets", "low=3", "--thinking-budget-message", "!", "--repetition-penalty",
                     "1.5", "--json", "hi")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)["outputs"][0]
    assert output["reasoning_text"].endswith("!") and output["text"].startswith(output["reasoning_text"] + "</think>")
    assert output["reasoning_tokens"] == 3 + 1 + len("</think>")
    assert json.loads(result.stdout)["token_counts"]["reasoning_tokens"] == output["reasoning_tokens"]


def test_kv_cache_dtype_is_checked_before_the_model_is_read(tmp_path):
    """Every command that loads a model takes --kv-cache-dtype; a bad value is one error line
    naming the flag and the allowed values (exit 2), before the (missing) model is read."""
    missing = str(tmp_path / "no-model")
    for command in (["generate", "--model", missing, "hi"], ["solve", "--model", missing, "what is 2+2?"],
                    ["serve", "--model", missing, "--port", "0"]):
        one_line_error(run_cli(*command, "--kv-cache-dtype", "fp8_e5m2"), "--kv-cache-dtype", "auto, fp8, fp8_e4m3")
    # bench prints its plan's estimate first; the error is its last line.
    bench = run_cli("bench", "--model", missing, "--tasks", "sum:2", "--strategies", "greedy", "--out",
                    str(tmp_path / "b"), "--kv-cache-dtype", "fp8_e5m2")
    assert bench.returncode == 2 and "Traceback" not in bench.stderr
    assert bench.stderr.strip().splitlines()[-1] == ("error: --kv-cache-dtype: kv_cache_dtype 'fp8_e5m2' is not one "
                                                     "of auto, fp8, fp8_e4m3")
    assert not (tmp_path / "b").exists()


def test_generate_with_an_fp8_kv_cache(tiny_llama):
    directory, _ = tiny_llama
    args = ["generate", "--model", str(directory), "--dtype", "float32", "--device", "cpu", "--max-tokens", "6",
            "--json", "hello"]
    fp8 = run_cli(*args, "--kv-cache-dtype", "fp8")
    assert fp8.returncode == 0, fp8.stderr
    assert len(json.loads(fp8.stdout)["outputs"][0]["token_ids"]) == 6
