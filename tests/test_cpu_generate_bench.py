"""benchmarks/cpu_generate.py: its columns are timed in interleaved, rotated rounds, and a
column whose engine fails is reported in the results instead of stopping the run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cpu_generate_bench", ROOT / "benchmarks" / "cpu_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StubColumn:
    def __init__(self, name: str, log: list, dies_at: int | None = None):
        self.name, self.log, self.dies_at, self.live = name, log, dies_at, True

    def time(self, measurement: str) -> None:
        self.log.append((measurement, self.name))
        if self.dies_at is not None and len([e for e in self.log if e[1] == self.name]) == self.dies_at:
            self.live = False


def test_rounds_interleave_the_columns_and_rotate_who_goes_first():
    module = load_script()
    log: list = []
    module.rounds([StubColumn(n, log) for n in "abc"], 3)
    batch1 = [name for measurement, name in log if measurement == "batch1"]
    assert batch1 == list("abc" "bca" "cab")  # every round times every column once, first one rotating
    assert [name for measurement, name in log if measurement == "n_samples"] == batch1
    assert [m for m, _ in log] == ["batch1"] * 9 + ["n_samples"] * 9


def test_a_column_that_dies_is_left_out_of_later_rounds():
    module = load_script()
    log: list = []
    module.rounds([StubColumn("a", log), StubColumn("b", log, dies_at=1)], 2)
    assert [name for _, name in log] == ["a", "b", "a", "a", "a"]  # b died on its first run: never asked again


def test_a_failing_column_is_reported_and_the_run_still_writes_its_file(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "benchmarks/cpu_generate.py", "--quantization", "int3", "--baselines", "none",
                           "--new-tokens", "2", "--samples", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["results"]["thinkwise:int3"]
    assert "quantization 'int3' is not supported" in result["failed"]  # the worker's own error, kept
    assert "thinkwise:int3: failed" in done.stdout


def test_repeats_below_one_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/cpu_generate.py", "--repeats", "0", "--out",
                           str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--repeats must be at least 1" in done.stderr
    assert not (tmp_path / "r.json").exists()
