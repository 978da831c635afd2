"""Presence/frequency/repetition penalties: equal to vLLM's formula, kept right on the device
through draws the host has not seen yet, redraws and forced tokens, and they change what
an engine run generates."""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.engine.penalties import PenaltyRow, PenaltyTracker
from thinkwise.engine.sampler import Sampler, SamplingRow
from thinkwise.errors import InvalidParameterError
from tests.engine.test_async_scheduling import PROMPT, pair, visible

VOCAB = 50


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float, frequency: float,
              repetition: float) -> torch.Tensor:
    """vLLM's apply_penalties for one row, written out from its definition."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[-1]).float() \
        if output else torch.zeros(logits.shape[-1])
    prompt_mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
    if prompt:
        prompt_mask[torch.tensor(prompt)] = True
    output_mask = counts > 0
    factor = torch.full_like(logits, repetition)
    factor[~(prompt_mask | output_mask)] = 1.0
    logits = torch.where(logits > 0, logits / factor, logits * factor)
    logits = logits - frequency * counts
    return logits - presence * output_mask.float()


def penalty_row(seq_id, tokens, num_prompt, presence, frequency, repetition, ahead=0):
    return PenaltyRow(("seq", seq_id), seq_id, presence, frequency, repetition, tokens, num_prompt,
                      len(tokens) - num_prompt + ahead)


def sampling_row(penalty, temperature=0.0):
    return SamplingRow(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=1, position=penalty.position,
                       logprobs=None, penalty=penalty)


def test_equal_to_vllm_formula_on_random_logits_and_histories():
    generator = torch.Generator().manual_seed(0)
    tracker = PenaltyTracker(torch.device("cpu"))
    logits = torch.randn(6, VOCAB, generator=generator) * 3
    settings = [(0.5, 0.3, 1.3), (-1.0, 2.0, 0.7), (2.0, -2.0, 1.0), (0.0, 0.0, 2.5), (0.0, 0.0, 1.0), (1.1, 0.1, 1.9)]
    rows, expected = [], []
    for i, (presence, frequency, repetition) in enumerate(settings):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        output = torch.randint(0, VOCAB, (i * 7,), generator=generator).tolist()  # repeats included
        penalty = None if i == 4 else penalty_row(i, prompt + output, len(prompt), presence, frequency, repetition)
        rows.append(SamplingRow(1.0, 0, 1.0, 0.0, 0, len(output), None, penalty=penalty))
        expected.append(logits[i] if i == 4 else reference(logits[i], prompt, output, presence, frequency, repetition))
    got = tracker.apply(logits.clone(), rows)
    torch.testing.assert_close(got, torch.stack(expected))


def test_device_counts_follow_draws_the_host_has_not_seen_redraws_and_forced_tokens():
    """The async pipeline's pattern: draw at position q, then at q + 1 before the host has
    the first token; a redraw at one position; a token forced by the host after a draw that
    was dropped. The logits seen at every draw match the reference on the true history."""
    generator = torch.Generator().manual_seed(1)
    sampler = Sampler("cpu")
    prompt = [3, 4, 5]
    tokens = list(prompt)  # the host's list
    args = (0.4, 0.6, 1.5)
    seen_logits = []

    def draw(ahead=0, temperature=0.0):
        logits = torch.randn(1, VOCAB, generator=generator)
        penalty = penalty_row(7, tokens, len(prompt), *args, ahead=ahead)
        applied = sampler.penalties.apply(logits.clone(), [sampling_row(penalty, temperature)])
        seen_logits.append((logits, applied, penalty.position))
        drawn, _ = sampler._draw(applied, [sampling_row(penalty, temperature)], exact=True)
        sampler.penalties.record([sampling_row(penalty, temperature)], drawn)
        return int(drawn[0])

    def check_last(history_output):
        logits, applied, _ = seen_logits[-1]
        torch.testing.assert_close(applied[0], reference(logits[0], prompt, history_output, *args))

    first = draw()
    check_last([])
    second = draw(ahead=1)  # launched behind: the host does not have `first` yet
    check_last([first])
    tokens.append(first)
    tokens.append(second)
    third = draw()
    check_last([first, second])
    # The draw of `third` is dropped (a redo): the host redraws position 2 itself.
    redrawn = draw()
    check_last([first, second])
    tokens.append(redrawn)
    dropped = draw()  # drawn, then the sequence changed: the host forces 11, 11 instead
    check_last([first, second, redrawn])
    tokens += [11, 11]
    draw()
    check_last([first, second, redrawn, 11, 11])
    assert third is not None and dropped is not None


def test_sampler_call_applies_penalties_before_the_draw():
    sampler = Sampler("cpu")
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 1.0  # the favourite, already generated: a presence penalty of 2 must move the argmax
    logits[0, 8] = 0.5
    penalty = penalty_row(1, [1, 2, 9], 2, 2.0, 0.0, 1.0)
    assert sampler(logits, [sampling_row(penalty)]).token_ids == [8]
    assert sampler(logits, [SamplingRow(0.0, 0, 1.0, 0.0, 0, 0, None)]).token_ids == [9]


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", float("nan")),
    ("frequency_penalty", 3), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")), ("presence_penalty", "1"), ("repetition_penalty", True),
])
def test_out_of_range_penalties_are_refused_by_name(field, value):
    with pytest.raises(InvalidParameterError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def repeats(token_ids):
    return len(token_ids) - len(set(token_ids))


def test_an_engine_run_with_penalties_stops_repeating(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert repeats(plain.outputs[0].token_ids) > 10  # a random model's greedy chain loops
    # Random logits span well under 2: presence 2 makes every generated token lose to a new one.
    fresh = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                  presence_penalty=2.0))[0]
    assert repeats(fresh.outputs[0].token_ids) == 0
    repetition = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                       repetition_penalty=50.0, frequency_penalty=1.0))[0]
    assert repeats(repetition.outputs[0].token_ids) < repeats(plain.outputs[0].token_ids) // 2
    assert not llm.engine.sampler.penalties.states or all(
        s.owner() is None or s.owner().is_finished for s in llm.engine.sampler.penalties.states.values())


def test_async_scheduling_gives_the_same_penalized_tokens(tiny_llama):
    sync, pipelined = pair(tiny_llama)
    prompts = [PROMPT, [256, 1, 2, 3], PROMPT[:5]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=3.0),
              SamplingParams(temperature=0.9, seed=3, max_tokens=25, ignore_eos=True, presence_penalty=1.0,
                             frequency_penalty=0.5),
              SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True, frequency_penalty=1.5)]
    expected = [visible(o) for o in sync.generate(prompts, params)]
    assert [visible(o) for o in pipelined.generate(prompts, params)] == expected
    assert pipelined.engine.pipeline.num_steps_behind > 0  # the penalized rows really ran behind


def test_the_tracker_never_reads_a_device_value_on_the_host(monkeypatch):
    """No host sync: apply and record only queue device work. Every way a tensor's value
    reaches Python (item, tolist, bool, int, float, index, numpy) raises during the draws."""
    sampler = Sampler("cpu")
    generator = torch.Generator().manual_seed(3)
    tokens = [1, 2, 3]
    history = []
    logits = [torch.randn(2, VOCAB, generator=generator) for _ in range(6)]

    def boom(*args, **kwargs):
        raise AssertionError("the penalty path read a tensor value on the host")

    for step in range(6):
        rows = [sampling_row(penalty_row(0, tokens, 3, 0.5, 0.5, 1.2, ahead=1 if history else 0), temperature=1.0),
                SamplingRow(0.0, 0, 1.0, 0.0, 0, 0, None)]
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
                patch.setattr(torch.Tensor, name, boom)
            applied = sampler.penalties.apply(logits[step].clone(), rows)
            drawn, _ = sampler._draw(applied, rows, exact=False)
            sampler.penalties.record(rows, drawn)
        if history:
            tokens.append(history[-1])  # the host learns a token one step late, as async scheduling does
        history.append(int(drawn[0]))
    counts = sampler.penalties.counts[sampler.penalties.states[0].slot]
    assert int(counts.sum()) == len(history)  # host-known tokens plus the one still in flight
