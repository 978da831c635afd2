"""Scheduler: shared-prefix (cascade) groups formed from forked samples."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.engine.scheduler import form_prefix_groups

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
    groups = form_prefix_groups(batch.sequences, batch.num_new_tokens, 4, min_shared_tokens=8)
    assert len(groups) == 1
    members = {batch.sequences[i].seq_id for i in groups[0].members}
    assert members == {s.seq_id for s in forked.sequences}
    assert groups[0].shared_tokens == 40  # the 10 full prompt blocks; the partial one was copied on write
    assert not {s.seq_id for s in other.sequences} & members
    # A threshold above the shared run: no group.
    assert form_prefix_groups(batch.sequences, batch.num_new_tokens, 4, min_shared_tokens=44) == []


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cascade_attention_does_not_change_outputs(llm, temperature):
    params = SamplingParams(n=4, temperature=temperature, seed=5, max_tokens=24, ignore_eos=True)
    plain = llm.generate(PROMPT, params)[0]
    llm.engine.scheduler.cascade_min_shared_tokens = 8  # on for this CPU run (the GPU default)
    steps_with_groups = []
    original = llm.engine.scheduler.schedule

    def schedule():
        batch = original()
        steps_with_groups.append(bool(batch.prefix_groups))
        return batch

    llm.engine.scheduler.schedule = schedule
    cascade = llm.generate(PROMPT, params)[0]
    assert any(steps_with_groups)
    assert [o.token_ids for o in cascade.outputs] == [o.token_ids for o in plain.outputs]
