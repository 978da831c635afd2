"""Scheduler: the shared prefixes it reports for forked samples, and what the runner makes of them."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.engine.scheduler import find_shared_prefixes

PROMPT = [256] + list(range(10, 50))  # 41 tokens: 10 full blocks of 4 + 1


@pytest.fixture()
def llm(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)


def test_forked_samples_form_one_group_unrelated_requests_none(llm):
    engine = llm.engine
    forked = engine.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=30))
    other = engine.add_request(PROMPT[:1] + [99] * 20, SamplingParams(max_tokens=30))
    engine.step()
    engine.step()
    batch = engine.scheduler.schedule()
    groups = batch.shared_prefixes  # a device-neutral fact, on CPU too
    assert groups == find_shared_prefixes(batch.sequences, batch.num_new_tokens, 4)
    assert len(groups) == 1
    members = {batch.sequences[i].seq_id for i in groups[0].members}
    assert members == {s.seq_id for s in forked.sequences}
    assert groups[0].shared_tokens == 40  # the 10 full prompt blocks; the partial one was copied on write
    assert not {s.seq_id for s in other.sequences} & members
    # The runner decides what to do with them: the CPU reference reads no prefix once ...
    runner = engine.runner
    assert runner.cascade_min_shared_tokens is None and runner.prefixes_read_once(groups) == []
    # ... a cascade kernel uses groups of at least its threshold.
    runner.cascade_min_shared_tokens = 8
    assert runner.prefixes_read_once(groups) == groups
    runner.cascade_min_shared_tokens = 44
    assert runner.prefixes_read_once(groups) == []


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cascade_attention_does_not_change_outputs(llm, temperature):
    params = SamplingParams(n=4, temperature=temperature, seed=5, max_tokens=24, ignore_eos=True)
    plain = llm.generate(PROMPT, params)[0]
    runner = llm.engine.runner
    runner.cascade_min_shared_tokens = 8  # on for this CPU run (the reference computes the cascade's math)
    steps_with_groups = []
    original = runner.execute

    def execute(sequences, counts, sample, copies, shared_prefixes=None):
        steps_with_groups.append(bool(shared_prefixes))
        return original(sequences, counts, sample, copies, shared_prefixes)

    runner.execute = execute
    cascade = llm.generate(PROMPT, params)[0]
    assert any(steps_with_groups)
    assert [o.token_ids for o in cascade.outputs] == [o.token_ids for o in plain.outputs]
