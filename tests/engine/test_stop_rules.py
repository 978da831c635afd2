"""Stop rules on a tiny model biased towards EOS: EOS ends a sample, `ignore_eos` runs it to
`max_tokens`, and `min_tokens` bans EOS and stop tokens until it is reached.

The random tiny models of the other tests almost never emit EOS, so a broken stop rule
goes unnoticed there. Here one embedding dimension is a large constant and the LM head
reads it mostly into EOS (and, less, into a second token `RUNNER_UP`), so EOS is the
greedy choice at every position, `RUNNER_UP` the choice when EOS is banned, and both
dominate sampling too. Every test states the exact output a correct engine gives.
"""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from tests.tiny_models import EOS_ID, make_tiny_model, reference_greedy

RUNNER_UP = 65  # an ordinary byte token, the model's choice whenever EOS is banned
PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80]


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-eos")
    model = make_tiny_model("llama", directory, seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0  # a constant, positive feature in every position
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS_ID, 0] = 3.0
        model.lm_head.weight[RUNNER_UP, 0] = 1.5
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def llm(eos_model):
    directory, _ = eos_model
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)


def test_the_model_really_prefers_eos(eos_model, llm):
    _, model = eos_model
    assert reference_greedy(model, PROMPT, 4) == [EOS_ID]
    assert EOS_ID in llm.engine.eos_token_ids and RUNNER_UP not in llm.engine.eos_token_ids


def test_eos_ends_the_sample_on_the_first_token(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.token_ids == [EOS_ID]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_ignore_eos_runs_to_max_tokens_through_sampled_eos(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    # EOS was drawn at every position, and none of them ended the sample.
    assert out.token_ids == [EOS_ID] * 12
    assert out.finish_reason == "length"


def test_ignore_eos_with_sampling_runs_every_sample_to_max_tokens(llm):
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True))[0]
    assert [len(o.token_ids) for o in out.outputs] == [9] * 4
    assert all(o.finish_reason == "length" for o in out.outputs)
    assert out.counts.generated_tokens == 36


def test_min_tokens_bans_eos_until_reached(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, min_tokens=5))[0].outputs[0]
    # Five banned positions take the runner-up, then EOS is allowed and ends the sample at once.
    assert out.token_ids == [RUNNER_UP] * 5 + [EOS_ID]
    assert out.finish_reason == "stop"


def test_min_tokens_bans_eos_when_sampling(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20, min_tokens=4))[0]
    for sample in out.outputs:
        assert EOS_ID not in sample.token_ids[:4]
        assert sample.token_ids[-1] == EOS_ID and len(sample.token_ids) == 5
        assert sample.finish_reason == "stop"


def test_min_tokens_bans_stop_token_ids_too(llm):
    # The runner-up is a stop token: banned (with EOS) for three positions, so the third
    # choice fills them; then EOS is allowed and ends the sample.
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, min_tokens=3,
                                              stop_token_ids=[RUNNER_UP]))[0].outputs[0]
    assert len(out.token_ids) == 4
    assert not {EOS_ID, RUNNER_UP} & set(out.token_ids[:3])
    assert out.token_ids[3] == EOS_ID and out.finish_reason == "stop"


def test_min_tokens_bans_a_stop_token_even_when_eos_is_ignored(llm):
    # ignore_eos lifts the EOS ban but not the stop-token ban: EOS (a stop token here) is
    # banned for four positions and ends the sample, as a stop token, on the fifth.
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, min_tokens=4, ignore_eos=True,
                                              stop_token_ids=[EOS_ID]))[0].outputs[0]
    assert out.token_ids == [RUNNER_UP] * 4 + [EOS_ID]
    assert out.finish_reason == "stop" and out.stop_reason == EOS_ID
