"""Preemption: a preempted sequence goes back to the front of the queue, and re-admitting it
does not count its own prompt, found in the prefix cache, as cached tokens again.

The scheduler tests drive `Scheduler` and `BlockManager` by hand with a cache small enough
that the second decode step of two running sequences needs a block no one has; the
engine test checks the same accounting end to end on the tiny model.
"""

from __future__ import annotations

from thinkwise import LLM, SamplingParams
from thinkwise.engine.block_manager import BlockManager
from thinkwise.engine.scheduler import Scheduler
from thinkwise.engine.sequence import Request, Sequence, SequenceStatus


def make_seq(name: str, tokens: list[int]) -> Sequence:
    request = Request(name, None, list(tokens), SamplingParams())
    seq = Sequence(request, tokens, len(tokens), 0, 0)
    request.sequences.append(seq)
    return seq


def run_step(bm: BlockManager, batch) -> None:
    """What the engine does after a step: advance progress, register full blocks, sample a token."""
    for seq, n in zip(batch.sequences, batch.num_new_tokens):
        seq.num_computed_tokens += n
        bm.register_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(200)


def two_running_and_one_waiting():
    bm = BlockManager(num_blocks=4, block_size=4, watermark=0)
    scheduler = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    first, second = make_seq("first", [1, 2, 3, 4, 5, 6, 7]), make_seq("second", [11, 12, 13, 14, 15, 16, 17])
    later = make_seq("later", [21, 22, 23])
    for seq in (first, second, later):
        scheduler.add(seq)
    batch = scheduler.schedule()  # both prompts (2 blocks each); 'later' waits for a sequence slot
    assert batch.sequences == [first, second] and list(scheduler.waiting) == [later]
    run_step(bm, batch)  # 8 tokens each: position 7 still fits their second block
    run_step(bm, scheduler.schedule())  # 9 tokens each: position 8 needs a fifth block
    return bm, scheduler, first, second, later


def test_a_preempted_sequence_goes_to_the_front_of_the_queue():
    bm, scheduler, first, second, later = two_running_and_one_waiting()
    batch = scheduler.schedule()
    assert batch.preempted == [second] and batch.sequences == [first]
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert list(scheduler.waiting) == [second, later]
    # When room comes back, the preempted sequence is admitted before the later arrival.
    scheduler.remove(first)
    batch = scheduler.schedule()
    assert batch.sequences[0] is second


def test_readmission_does_not_count_its_own_prompt_as_cached_again():
    bm, scheduler, first, second, later = two_running_and_one_waiting()
    assert second.request.counts.prompt_tokens_cached == 0
    scheduler.schedule()  # preempts 'second'; its full prompt block stays registered
    scheduler.remove(first)
    batch = scheduler.schedule()
    assert batch.sequences[0] is second
    assert second.num_computed_tokens == 4, "the re-admission should have found its own first block cached"
    assert second.request.counts.prompt_tokens_cached == 0


def test_engine_counts_no_cached_tokens_for_distinct_prompts_despite_preemption(tiny_llama):
    directory, _ = tiny_llama
    tight = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=20)
    prompts = [[256, 10, 20, 30, 40, 50, 60, 70, 80], [256, 1, 2, 3, 4], [256] + list(range(30, 45)), [256, 77, 78, 79]]
    outputs = tight.generate(prompts, SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True))
    assert tight.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        # No two prompts share a first block, so nothing was ever served from another request.
        assert output.counts.prompt_tokens_cached == 0, output.counts
        assert output.counts.prompt_tokens == len(prompt)
