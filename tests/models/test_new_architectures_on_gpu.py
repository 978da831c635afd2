"""Gemma 3 and Mistral on the GPU path (Triton decode attention with its window start, the
fused GeGLU kernel, CUDA graphs, async scheduling): greedy in fp32 equal to transformers,
token for token, as on the CPU. Skipped without CUDA (the CPU twins are checked in
test_gemma3.py and test_mistral.py)."""

from __future__ import annotations

import pytest
import torch

from tests.models import model_checks as checks
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("architecture", ["gemma3", "mistral"])
def test_greedy_on_gpu_matches_transformers(tmp_path, architecture):
    reference = make_tiny_model(architecture, tmp_path, seed=8)
    llm = checks.check_greedy(tmp_path, reference, device="cuda", block_size=16)
    assert llm.engine.runner.graph_decoder is not None  # the graphed decode path really ran
