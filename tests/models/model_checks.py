"""Checks of one thinkwise model against its transformers twin, shared by the model tests.

Each takes a tiny model directory (tests/tiny_models.py) and the fp32 transformers model
made with it, runs thinkwise on the CPU in fp32 with 4-token blocks, and asserts logits
within 1e-4 or greedy token for token. The prompts run past `TINY_WINDOW`, so a model
that ignored its sliding window fails them.
"""

from __future__ import annotations

import torch

from tests.logit_probes import RecordingSampler, prefill_logits
from tests.tiny_models import TINY_WINDOW, reference_greedy
from thinkwise import LLM, SamplingParams

TOLERANCE = 1e-4
PROMPTS = [
    [256, 5, 9, 77, 31, 2, 200, 45, 45, 8, 19],
    [256, 100],
    [256, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3],
    [256, 1, 2, 3, 4, 5],
    [256, 250, 40, 10, 90, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77],
    [256, 13],
]
# 16 tokens (four whole blocks) shared, each longer than the window.
SHARED = [256, 31, 41, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27]
assert len(PROMPTS[4]) > 3 * TINY_WINDOW and len(SHARED) > 2 * TINY_WINDOW


def make_llm(directory, **options) -> LLM:
    options.setdefault("dtype", "float32")
    options.setdefault("device", "cpu")
    options.setdefault("block_size", 4)
    return LLM(str(directory), **options)


def max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def check_prefill_logits(directory, reference) -> None:
    """Every position of a prompt four windows long, from one prefill step."""
    prompt = PROMPTS[4]
    ours = prefill_logits(make_llm(directory).engine, prompt)
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt])).logits[0].float()
    assert max_error(ours, theirs) <= TOLERANCE


def check_decode_logits(directory, reference, steps: int = 24) -> None:
    """Each decode step's logits equal a whole-sequence forward at that position."""
    llm = make_llm(directory)
    recorder = RecordingSampler(llm.engine.sampler)
    llm.engine.sampler = recorder
    prompt = PROMPTS[2]
    tokens = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    tokens = tokens.outputs[0].token_ids
    with torch.no_grad():
        full = reference(torch.tensor([prompt + tokens])).logits[0].float()
    assert len(recorder.logits) == steps
    for step, logits in enumerate(recorder.logits):
        assert max_error(logits[0], full[len(prompt) - 1 + step]) <= TOLERANCE, f"decode step {step} differs"


def check_greedy(directory, reference, max_tokens: int = 24, **options) -> LLM:
    """A batch of prompts, greedy, equal to transformers' generate token for token."""
    llm = make_llm(directory, **options)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, max_tokens), prompt
    llm.last_outputs = outputs
    return llm


def check_greedy_under_preemption(directory, reference) -> None:
    # Six sequences of up to 23 + 24 tokens need up to 12 blocks of 4 each; 16 force preemption.
    llm = check_greedy(directory, reference, num_kv_blocks=16)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.counts.recomputed_tokens > 0 for o in llm.last_outputs)


def check_chunked_prefill(directory, reference) -> None:
    # Chunks of 5 tokens: each chunk's queries attend to earlier chunks through the window.
    check_greedy(directory, reference, max_tokens=12, max_num_batched_tokens=5)


def check_prefix_sharing(directory, reference) -> None:
    """Prompts that share a cached 16-token prefix, and greedy samples forked from one
    prefill, each equal to transformers run on the whole prompt."""
    llm = make_llm(directory)
    params = SamplingParams(temperature=0, max_tokens=16)
    first = llm.generate([SHARED + [5]], params)[0]
    assert first.outputs[0].token_ids == reference_greedy(reference, SHARED + [5], 16)
    prompts = [SHARED + [9, 8], SHARED + [100, 101, 102, 103, 104]]
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        assert output.counts.prompt_tokens_cached >= 16, output.counts  # served from the first request's blocks
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, 16)
    forked = llm.generate([SHARED + [7]], SamplingParams(temperature=0, max_tokens=16, n=3))[0]
    expected = reference_greedy(reference, SHARED + [7], 16)
    assert [sample.token_ids for sample in forked.outputs] == [expected] * 3
