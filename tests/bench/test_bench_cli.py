"""`thinkwise bench` arguments: mistakes are one-line errors before any model loads (the
model path given does not exist, so reaching the load would fail differently), the
estimate goes to stderr, --dry-run runs nothing, and a finished run prints intervals."""

from __future__ import annotations

import pytest

from thinkwise.cli import main

MISSING = "/nonexistent/model-dir"


def bench(tmp_path, *extra: str) -> list[str]:
    return ["bench", "--model", MISSING, "--tasks", "sum:2,river:2", "--strategies", "greedy,majority@4",
            "--n-per-level", "3", "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--n-per-level", "0"], "--n-per-level must be >= 1"),
    (["--strategies", "greedy,telepathy@3"], "unknown strategy 'telepathy@3'"),
    (["--strategies", " , "], "--strategies is empty"),
    (["--tasks", "summ:2"], "unknown task family 'summ'"),
    (["--tasks", "sum:9-2"], "empty level range"),
])
def test_mistakes_are_one_line_errors_before_the_model_loads(tmp_path, capsys, extra, message):
    assert main(bench(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert "not found" not in err  # the (missing) model was never reached


def test_prompt_style_is_a_choice(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(bench(tmp_path, "--prompt-style", "verbose"))
    assert exit_info.value.code == 2 and "invalid choice: 'verbose'" in capsys.readouterr().err


def test_dry_run_prints_the_estimate_on_stderr_and_runs_nothing(tmp_path, capsys):
    assert main(bench(tmp_path, "--dry-run", "--seeds", "2")) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout carries results only
    # sum:2 has 3 problems, river:2 one (a single instance exists): 4 problems; greedy once,
    # majority@4 twice (two seeds): 4 + 8 runs, 4 + 8 x 4 samples.
    assert "estimate: 12 runs to do (4 problems x strategies x 2 seeds (greedy once)), 36 samples" in captured.err
    assert "river level 2 has only 1 distinct problem; running those, not repeats" in captured.err
    assert not (tmp_path / "out").exists()


def test_a_long_run_on_cpu_is_announced(tmp_path, capsys):
    args = ["bench", "--model", MISSING, "--tasks", "hanoi:5-6", "--strategies", "majority@8", "--n-per-level", "6",
            "--out", str(tmp_path / "out"), "--dry-run"]
    assert main(args) == 0
    assert "warning: a long run on a CPU" in capsys.readouterr().err


def test_a_run_prints_accuracy_with_intervals(tiny_llama, tmp_path, capsys):
    directory, _ = tiny_llama
    args = ["bench", "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--tasks", "sum:1",
            "--strategies", "greedy,majority@2", "--n-per-level", "2", "--max-tokens", "8", "--out",
            str(tmp_path / "out")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "accuracy [95% CI]" in captured.out and "[0.00, 0.66]" in captured.out  # 0/2 on a random model
    assert "estimate: 4 runs" in captured.err and "4/4" in captured.err  # the per-problem bar ended at 4 of 4
