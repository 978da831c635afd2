"""Benchmark scripts refuse a bad flag value with a usage error naming it, before any GPU work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def step_profile(*flags: str, script: str = "gpu_step_profile.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"benchmarks/{script}", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


QUANTIZED_PROBES = ["gpu_step_profile.py", "gpu_host_vs_gpu.py"]


@pytest.mark.parametrize("script", QUANTIZED_PROBES)
@pytest.mark.parametrize("value", ["int3", "int4-g7", "'; rm -rf /", "int8 int4", "gguf" * 500])
def test_step_profile_refuses_an_unknown_quantization(value, script):
    done = step_profile("--quantization", value, script=script)
    assert done.returncode == 2  # argparse's usage error, not a traceback
    assert "not supported" in done.stderr and "Traceback" not in done.stderr
    assert "int8" in done.stderr  # the error lists the choices


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
@pytest.mark.parametrize("script", QUANTIZED_PROBES)
def test_step_profile_takes_a_valid_quantization_to_the_gpu_check(script):
    done = step_profile("--quantization", "int4-g64", *(["--cprofile"] if script == "gpu_host_vs_gpu.py" else []),
                        script=script)
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def attention_knobs(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_attention_knobs.py", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags", [("--stages", "2,x"), ("--tiles", ""), ("--warps", "0"), ("--waves", "4;rm -rf /"),
                                   ("--batch", "-1"), ("--context", "100"), ("--heads", "12", "--kv-heads", "8")])
def test_attention_knobs_refuses_a_bad_value(flags):
    done = attention_knobs(*flags)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_attention_knobs_grid_puts_the_defaults_first_and_keeps_triton_default_stages():
    from benchmarks.gpu_attention_knobs import fp8_grid, stage_list

    assert stage_list("default,2") == [None, 2]
    defaults = {"FP8_TILE": 32, "FP8_WARPS": 2, "FP8_STAGES": None, "SPLIT_WAVES": 4, "PREFETCH_16BIT": True}
    grid = fp8_grid([64, 32], [1, 2], [2, None], [8, 4], defaults)
    assert len(grid) == 16 and len({tuple(k.values()) for k in grid}) == 16
    assert grid[0] == {"FP8_TILE": 32, "FP8_WARPS": 2, "FP8_STAGES": None, "SPLIT_WAVES": 4}
    assert grid[1] == {"FP8_TILE": 64, "FP8_WARPS": 1, "FP8_STAGES": 2, "SPLIT_WAVES": 8}  # otherwise in order


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_attention_knobs_ends_with_a_message_without_a_gpu(tmp_path):
    done = attention_knobs("--out", str(tmp_path / "k.json"))
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "k.json").exists()


def test_attention_knobs_summary_takes_bf16s_default_as_the_unified_max():
    from benchmarks.gpu_attention_knobs import summarize

    defaults = {"FP8_TILE": 64, "FP8_WARPS": 2, "FP8_STAGES": 2, "SPLIT_WAVES": 4, "PREFETCH_16BIT": True}
    shape = {"heads": 32,
             "bf16": [{"PREFETCH_16BIT": True, "unified_max": False, "us": 794.0},
                      {"PREFETCH_16BIT": True, "unified_max": True, "us": 768.8},
                      {"PREFETCH_16BIT": False, "unified_max": True, "us": 830.4}],
             "fp8": [{"FP8_TILE": 64, "FP8_WARPS": 2, "FP8_STAGES": 2, "SPLIT_WAVES": 4, "error_vs_bf16": 0.04, "us": 424.4},
                     {"FP8_TILE": 32, "FP8_WARPS": 1, "FP8_STAGES": 4, "SPLIT_WAVES": 8, "error_vs_bf16": 0.04, "us": 400.0},
                     {"FP8_TILE": 16, "FP8_WARPS": 1, "FP8_STAGES": 4, "SPLIT_WAVES": 8, "error_vs_bf16": 0.5, "us": 1.0}]}
    summarize(shape, defaults)
    summary = shape["summary"]
    assert summary["bf16_default_us"] == 768.8 and summary["bf16_synchronized_us"] == 794.0
    assert summary["default_fp8"]["us"] == 424.4 and summary["best_fp8"]["us"] == 400.0  # a wrong result never wins
    assert summary["default_fp8_vs_default_bf16"] == round(768.8 / 424.4, 3)
    assert summary["default_fp8_vs_synchronized_bf16"] == round(794.0 / 424.4, 3)


def dequantize_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_dequantize.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("flags", [("--tiles", "3x256x4"), ("--tiles", "16x256"), ("--tiles", ""),
                                   ("--tiles", "16x256x64"), ("--tiles", "256x1024x4"), ("--method", "int3"),
                                   ("--tiles", "16x256x4;rm -rf /")])
def test_dequantize_bench_refuses_a_bad_value(flags):
    done = dequantize_bench(*flags)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_dequantize_bench_ends_with_a_message_without_a_gpu(tmp_path):
    done = dequantize_bench("--tiles", "16x256x4,32x512x8", "--out", str(tmp_path / "d.json"))
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("group", [0, 32])
def test_dequantize_bench_times_only_variants_equal_to_the_twin(group, monkeypatch):
    """Under the interpreter: every variant is checked bit for bit before it is timed; one that
    writes other values is reported and can never be the best."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks.gpu_dequantize import measure_shape, variant_name
    from thinkwise.kernels import triton_quant_gemm as tq

    real = tq.dequantize

    def broken_for_wide_tiles(*args, tile=None, **kwargs):
        out = real(*args, tile=tile, **kwargs)
        return out + 1 if tile == (8, 128, 4) else out

    monkeypatch.setattr(tq, "dequantize", broken_for_wide_tiles)
    variants = [((16, 64, 4), False, True), ((8, 128, 4), False, True), ((16, 64, 4), bool(group), False)]
    totals = {v: 0.0 for v in variants}
    line = measure_shape("tiny", 24, 128, variants, group, totals, "cpu", lambda call: 7.0)
    assert line["us"][variant_name(*variants[0])] == 7.0 and totals[variants[0]] == 7.0
    assert line["us"][variant_name(*variants[1])] == "mismatch with the twin" and totals[variants[1]] == float("inf")
    assert line["us"][variant_name(*variants[2])] == 7.0  # the interpreter rounds by hand whatever is asked


def test_throughput_prefill_split_times_one_token_runs_of_the_same_requests(capsys):
    """--prefill-split: prefill is the median of one-token runs (max_tokens=1, every other
    parameter kept), decode a step is the rest of the full run over its other steps; the
    quantized column's line names both against the 16-bit column's."""
    from benchmarks.gpu_throughput import prefill_split, print_quantization_ratios
    from thinkwise import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, seed=3)
    seen, prefill_seconds = [], iter([0.3, 0.2, 0.25])

    def timed(run_params, new_tokens):
        seen.append((run_params, new_tokens))
        return 64 * new_tokens / next(prefill_seconds), []

    split = prefill_split(timed, params, 64, 128, rate=64 * 128 / 1.5, repeats=3)
    assert [n for _, n in seen] == [1, 1, 1]
    assert all(p.max_tokens == 1 and p.seed == 3 and p.ignore_eos for p, _ in seen) and params.max_tokens == 128
    assert split == {"prefill_s": 0.25, "full_s": 1.5, "decode_ms_per_step": round(1250 / 127, 3)}
    rows = [dict(shape="s", batch=64, extras="none", quantization="none", thinkwise_tok_s=100.0, **split),
            dict(shape="s", batch=64, extras="none", quantization="int4", thinkwise_tok_s=90.0, prefill_s=0.3,
                 full_s=1.6, decode_ms_per_step=10.5)]
    print_quantization_ratios(rows)
    out = capsys.readouterr().out
    assert rows[1]["vs_bf16"] == 0.9 and "prefill 0.3 s vs 0.25 s" in out and "decode 10.5 vs 9.843 ms a step" in out


@pytest.mark.parametrize("flags", [("--prefill-split=yes",), ("--prefill-split=1;rm -rf /",), ("--repeats", "x"),
                                   ("--candidate-tilings=all",)])
def test_throughput_refuses_a_value_for_the_prefill_split_switch(flags):
    done = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_throughput_takes_the_prefill_split_switch_to_the_gpu_check(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--prefill-split", "--candidate-tilings",
                           "--out", str(tmp_path / "t.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["qkv,attn", "'; rm -rf /", "", "lm_head " * 50])
def test_quant_gemm_refuses_an_unknown_projection(value):
    done = subprocess.run([sys.executable, "benchmarks/gpu_quant_gemm.py", "--projections", value], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--projections: unknown" in done.stderr and "Traceback" not in done.stderr
    assert "gate_up" in done.stderr  # the error lists the choices


@pytest.mark.parametrize("value", ["weightb", "wide;rm -rf /", ""])
def test_quant_gemm_refuses_an_unknown_sweep(value):
    done = subprocess.run([sys.executable, "benchmarks/gpu_quant_gemm.py", "--sweep", value], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_quant_gemm_takes_known_projections_to_the_gpu_check():
    done = subprocess.run([sys.executable, "benchmarks/gpu_quant_gemm.py", "--projections", "qkv, gate_up"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "measures a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
