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
    assert runner.cascade_min_shared_tokens is None and runner.prefixes_read_once(batch) == []
    # ... a cascade kernel uses groups of at least its threshold.
    runner.cascade_min_shared_tokens = 8
    assert runner.prefixes_read_once(batch) == groups
    runner.cascade_min_shared_tokens = 44
    assert runner.prefixes_read_once(batch) == []


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


def test_shared_prefixes_equal_a_plain_column_by_column_reference():
    """Random block tables (some sharing leading blocks): the groups and their shared tokens
    are what comparing the tables column by column gives, cut to whole blocks before the
    token each sample decodes."""
    import random
    from types import SimpleNamespace

    def reference(sequences, counts, block_size):
        buckets = {}
        for index, (seq, n) in enumerate(zip(sequences, counts)):
            if n == 1 and seq.block_table:
                buckets.setdefault(seq.block_table[0], []).append(index)
        groups = []
        for members in buckets.values():
            if len(members) < 2:
                continue
            shared = 0
            for column in zip(*(sequences[i].block_table for i in members)):
                if any(block != column[0] for block in column):
                    break
                shared += 1
            limit = min(sequences[i].num_computed_tokens for i in members)
            tokens = min(shared * block_size, limit // block_size * block_size)
            if tokens > 0:
                groups.append((members, tokens))
        return groups

    rng = random.Random(0)
    for _ in range(300):
        block_size = rng.choice([1, 4, 16])
        roots = [[rng.randrange(100) for _ in range(rng.randint(1, 8))] for _ in range(3)]
        sequences, counts = [], []
        for _ in range(rng.randint(1, 10)):
            root = rng.choice(roots)
            table = root[: rng.randint(0, len(root))] + [rng.randrange(100, 200) for _ in range(rng.randint(0, 3))]
            computed = rng.randint(0, max(0, len(table) * block_size - 1))
            sequences.append(SimpleNamespace(block_table=table, num_computed_tokens=computed))
            counts.append(rng.choice([1, 1, 1, 3]))
        got = [(g.members, g.shared_tokens) for g in find_shared_prefixes(sequences, counts, block_size)]
        assert got == reference(sequences, counts, block_size)
