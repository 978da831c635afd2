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


def test_batched_prefill_matches_per_sequence_prefill(tiny_llama):
    directory, reference = tiny_llama
    from thinkwise.engine.model_runner import ModelRunner

    llm = LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512)
    params = SamplingParams(temperature=0, max_tokens=20)
    # A shared prefix makes later prompts start from cached blocks (queries start mid-context).
    prompts = [PROMPTS[2] + [7, 8, 9], PROMPTS[2] + [1], PROMPTS[0], PROMPTS[1] * 3]
    llm.generate([PROMPTS[2]], params)
    outputs = llm.generate(prompts, params)
    assert outputs[0].counts.prompt_tokens_cached > 0
    batched = [o.outputs[0].token_ids for o in outputs]
    original = ModelRunner.MAX_PREFILL_MASK
    ModelRunner.MAX_PREFILL_MASK = 0  # force the per-sequence loop
    try:
        looped = [o.outputs[0].token_ids for o in
                  LLM(str(directory), device="cuda", dtype="float32", block_size=4, num_kv_blocks=512,
                      enable_prefix_caching=False).generate(prompts, params)]
    finally:
        ModelRunner.MAX_PREFILL_MASK = original
    assert batched == looped
    for prompt, tokens in zip(prompts, batched):
        assert tokens == reference_greedy(reference, prompt, 20)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cascade_and_unified_max_do_not_change_outputs(tiny_llama, cuda_graphs):
    directory, _ = tiny_llama
    prompt = [256] + list(range(10, 80))
    params = SamplingParams(n=6, temperature=1.0, seed=11, max_tokens=40, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", block_size=4, num_kv_blocks=512, cuda_graphs=cuda_graphs)
    plain = LLM(str(directory), unified_max_softmax=False, cascade_min_shared_tokens=None, **common)
    fast = LLM(str(directory), cascade_min_shared_tokens=8, **common)
    assert fast.engine.runner.unified_max is not None
    assert "phi" in fast.engine.run_metadata["unified_max_softmax"]
    expected = [o.token_ids for o in plain.generate(prompt, params)[0].outputs]
    got = [o.token_ids for o in fast.generate(prompt, params)[0].outputs]
    assert got == expected
    if cuda_graphs:
        assert any(key[2] for key in fast.engine.runner.graph_decoder.graphs)  # cascade graphs were used
