"""bf16 decode steps agree with a prefill of the same tokens as closely as transformers' do.

For every architecture and every path a decode step can take (plain decode, after a
chunked prefill, after a prefix-cache hit, in forked samples, and CUDA graphs on a GPU),
the logits the sampler sees at each step are compared with one prefill over the whole
sequence. The tolerance comes from transformers itself: its bf16 decode (KV cache, one
token at a time) against its own bf16 prefill of the same tokens, doubled, and never
below two bf16 spacings of the logits (a logit rounded to bf16 moves by one).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.logit_probes import RecordingSampler, prefill_logits
from thinkwise import LLM, SamplingParams

PROMPT = [256, 5, 9, 77, 31, 2, 200, 45, 45, 8, 19, 3, 101, 7]
NEW_TOKENS = 16


def _bf16_spacing(value: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(value, 1e-30))) - 7)


def _make(directory, device="cpu", **options) -> LLM:
    options.setdefault("block_size", 4)
    return LLM(str(directory), dtype="bfloat16", device=device, **options)


def _prefill_logits(directory, ids: list[int], device="cpu") -> torch.Tensor:
    """Logits at every position of `ids` from one prefill (no cache, no chunking)."""
    return prefill_logits(_make(directory, device=device, enable_prefix_caching=False).engine, ids)


def _transformers_gap(reference, ids: list[int], prompt_len: int) -> float:
    """transformers bf16: max |decode logits - prefill logits| over the generated positions."""
    model = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0].float()
        out = model(torch.tensor([ids[:prompt_len]]), use_cache=True)
        cache, gap = out.past_key_values, 0.0
        for position in range(prompt_len, len(ids)):
            out = model(torch.tensor([[ids[position]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            gap = max(gap, (out.logits[0, -1].float() - full[position]).abs().max().item())
    return gap


def _tolerance(reference, ids, prompt_len, logits) -> float:
    return max(2 * _transformers_gap(reference, ids, prompt_len), 2 * _bf16_spacing(logits.abs().max().item()))


def _check(directory, reference, llm: LLM, prompt: list[int], params: SamplingParams, device="cpu",
           first_request=None) -> None:
    recorder = RecordingSampler(llm.engine.sampler)
    llm.engine.sampler = recorder
    out = llm.generate([prompt], params)[0]
    llm.engine.sampler = recorder.inner
    samples = [o.token_ids for o in out.outputs]
    for sample in samples[1:]:  # greedy forks must agree token for token
        assert sample == samples[0]
    tokens = samples[0]
    ids = prompt + tokens
    full = _prefill_logits(directory, ids, device=device)
    tolerance = _tolerance(reference, ids, len(prompt), full)
    assert len(recorder.logits) == len(tokens)
    for step, logits in enumerate(recorder.logits):
        expected = full[len(prompt) - 1 + step]
        for row in logits.cpu():  # every forked sample's row
            gap = (row - expected).abs().max().item()
            assert gap <= tolerance, f"step {step}: decode vs prefill {gap:.4f} > {tolerance:.4f}"


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_plain_decode_agrees_with_prefill(tiny):
    _arch, directory, reference = tiny
    _check(directory, reference, _make(directory), PROMPT, GREEDY)


def test_decode_after_chunked_prefill_agrees_with_prefill(tiny):
    _arch, directory, reference = tiny
    llm = _make(directory, max_num_batched_tokens=5)  # the 14-token prompt is prefilled in 3 chunks
    _check(directory, reference, llm, PROMPT, GREEDY)


def test_decode_after_prefix_cache_hit_agrees_with_prefill(tiny):
    _arch, directory, reference = tiny
    llm = _make(directory)
    llm.generate([PROMPT[:9] + [60, 61]], SamplingParams(temperature=0, max_tokens=2))  # caches 2 blocks
    recorder_probe = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0]
    assert recorder_probe.counts.prompt_tokens_cached >= 8  # the path under test really hit the cache
    _check(directory, reference, llm, PROMPT, GREEDY)


def test_forked_samples_agree_with_prefill(tiny):
    _arch, directory, reference = tiny
    _check(directory, reference, _make(directory), PROMPT,
           SamplingParams(n=3, temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_agrees_with_prefill(tiny):
    _arch, directory, reference = tiny
    # Synchronous steps, so every sampled step goes through the recorder; the graphs still run.
    llm = _make(directory, device="cuda", cuda_graphs=True, async_scheduling=False)
    assert llm.engine.runner.graph_decoder is not None
    _check(directory, reference, llm, PROMPT, SamplingParams(n=3, temperature=0, max_tokens=NEW_TOKENS,
                                                              ignore_eos=True), device="cuda")
