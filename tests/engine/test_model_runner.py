"""ModelRunner pieces that the CPU runs too: the unified-max calibration (used by the CUDA
decode kernel, computed the same way anywhere) and which shared prefixes a device reads once."""

from __future__ import annotations

import math

import pytest

from thinkwise import LLM
from thinkwise.engine.model_runner import CALIBRATION_PROMPTS
from thinkwise.kernels import paged_attention


@pytest.fixture(scope="module")
def runner(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
               cpu_gemm_dispatch=False).engine.runner


def test_calibration_records_every_prefill_row_through_the_metadata(runner):
    phi, stats = runner.calibrate_unified_max()
    config = runner.config
    tokens = min(256, runner.num_blocks * runner.block_size // CALIBRATION_PROMPTS)  # 64 here
    # one maximum per query row, head and layer
    assert stats["calibration_rows"] == CALIBRATION_PROMPTS * tokens * config.num_heads * config.num_layers
    assert math.isfinite(phi) and stats["phi"] == round(phi, 4)
    assert 0.0 <= stats["calibration_rows_outside_window"] <= 1.0
    # Seeded: the same prompts, the same phi.
    assert runner.calibrate_unified_max()[0] == phi
    # Nothing is left switched on in the kernel module (the recorder lived in the metadata).
    assert not hasattr(paged_attention, "score_recorder")


def test_the_cpu_reads_no_prefix_once(runner):
    assert runner.cascade_min_shared_tokens is None and runner.graph_decoder is None
