"""GPU-only checks (skipped without CUDA): CUDA-graph decode equals eager decode and transformers."""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from tests.tiny_models import reference_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[256, 5, 9, 77, 31, 2, 200], [256, 100], [256] + list(range(30, 60)), [256, 1, 2, 3, 4, 5]] * 3


def test_cuda_graph_decode_matches_eager_and_transformers(tiny_llama):
    directory, reference = tiny_llama
    params = SamplingParams(temperature=0, max_tokens=40)
    graphed = LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512)
    eager = LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512, cuda_graphs=False)
    assert graphed.engine.runner.graph_decoder is not None
    got = [o.outputs[0].token_ids for o in graphed.generate(PROMPTS, params)]
    assert graphed.engine.runner.graph_decoder.graphs  # decode steps really replayed graphs
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    assert got == expected
    for prompt, tokens in zip(PROMPTS[:4], got):
        assert tokens == reference_greedy(reference, prompt, 40)


def test_cuda_graphs_with_forks_and_seeds(tiny_llama):
    directory, _ = tiny_llama
    params = SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
    graphed = LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512)
    eager = LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512, cuda_graphs=False)
    a = graphed.generate(PROMPTS[0], params)[0]
    b = eager.generate(PROMPTS[0], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    bm = graphed.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
