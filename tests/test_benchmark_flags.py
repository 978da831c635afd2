"""Benchmark scripts refuse a bad flag value with a usage error naming it, before any GPU work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def step_profile(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_step_profile.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("value", ["int3", "int4-g7", "'; rm -rf /", "int8 int4", "gguf" * 500])
def test_step_profile_refuses_an_unknown_quantization(value):
    done = step_profile("--quantization", value)
    assert done.returncode == 2  # argparse's usage error, not a traceback
    assert "not supported" in done.stderr and "Traceback" not in done.stderr
    assert "int8" in done.stderr  # the error lists the choices


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_step_profile_takes_a_valid_quantization_to_the_gpu_check():
    done = step_profile("--quantization", "int4-g64")
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
