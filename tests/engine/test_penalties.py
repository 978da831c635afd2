"""Presence/frequency/repetition penalties: equal to vLLM's formula, kept right on the device
through draws the host has not seen yet, redraws and forced tokens, and they change what
an engine run generates."""

from __future__ import annotations

import os

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


class _Sequence:  # what the tracker keeps a weak reference to
    def __init__(self):
        self.is_finished = False


class _Simulated:
    """A sequence as the engine drives it: host tokens, plus draws still on the device
    (position -> token, read here only to build the reference)."""

    def __init__(self, seq_id, prompt, params):
        self.key, self.seq_id, self.prompt, self.params = _Sequence(), seq_id, prompt, params
        self.tokens = list(prompt)
        self.inflight: dict[int, int] = {}

    @property
    def known(self):
        return len(self.tokens) - len(self.prompt)

    def row(self, ahead):
        penalty = PenaltyRow(self.key, self.seq_id, *self.params, self.tokens, len(self.prompt), self.known + ahead)
        return SamplingRow(1.0, 0, 1.0, 0.0, self.seq_id, penalty.position, None, penalty=penalty)

    def true_output(self, position):
        return self.tokens[len(self.prompt):] + [self.inflight[p] for p in range(self.known, position)]


SCHEDULE_CASES = [("cpu", True, "twin"), ("cpu", False, "twin"), ("cpu", True, "triton")]
if torch.cuda.is_available():  # the GPU path as the engine runs it: the kernel, under sync debug mode "error"
    SCHEDULE_CASES += [("cuda", True, "penalize"), ("cuda", False, "penalize")]


@pytest.mark.parametrize("device, same_rows_list, kernel", SCHEDULE_CASES)
def test_random_schedules_match_the_reference_at_every_draw(device, same_rows_list, kernel, monkeypatch):
    """Many sequences through a random schedule: batches in a random order and subset, with rows
    without penalties between them; draws one or two steps ahead of the host; tokens landing
    late, redrawn by the host or forced (the draws in flight dropped); sequences finishing and
    new ones taking their slots (a fresh prompt mask). At every draw each penalized row equals
    vLLM's formula on the true history and every other row is untouched. `same_rows_list`:
    `record` gets the list `apply` saw (the sampler's way) or an equal new one (staged afresh);
    `kernel`: the logits go through the twin (the CPU path) or the Triton kernel (the GPU path,
    here in the interpreter) with the tracker's staged tensors; on a GPU, `penalize` picks the
    kernel and any host synchronization inside `apply` or `record` raises."""
    if kernel == "triton":
        from thinkwise.engine import penalties
        from thinkwise.kernels import triton_penalties

        if not triton_penalties.HAVE_TRITON or (not torch.cuda.is_available()
                                                 and os.environ.get("TRITON_INTERPRET") != "1"):
            pytest.skip("needs triton (on CPU with TRITON_INTERPRET=1, as the conftest sets)")
        monkeypatch.setattr(penalties, "_penalize", triton_penalties.triton_penalize)
    generator = torch.Generator().manual_seed(5)
    tracker = PenaltyTracker(torch.device(device))
    cuda = device == "cuda"

    def rand(n):
        return int(torch.randint(0, n, (1,), generator=generator))

    settings = [(0.5, 0.3, 1.3), (-1.0, 2.0, 0.7), (2.0, -0.5, 1.0), (0.0, 1.0, 2.5)]
    next_id = iter(range(10**6))

    def new_sequence():
        prompt = [rand(VOCAB) for _ in range(1 + rand(8))]
        return _Simulated(next(next_id), prompt, settings[rand(len(settings))])

    live = [new_sequence() for _ in range(6)]
    for step in range(60):
        batch = [s for s in live if rand(4)]  # a random subset...
        batch = [batch[i] for i in torch.randperm(len(batch), generator=generator).tolist()]  # ...in a random order
        if not batch:
            continue
        rows, expected_rows, chosen = [], [], []
        logits = torch.randn(len(batch) + 2, VOCAB, generator=generator) * 3
        plain_at = sorted({rand(len(batch) + 2), rand(len(batch) + 2)})
        for s in batch:
            ahead = len(s.inflight) if s.inflight and rand(3) else 0  # 0: the host drops what is in flight
            chosen.append((s, s.known + ahead))
        sequences = iter(chosen)
        for r in range(len(batch) + 2):
            if r in plain_at or len(rows) - len(plain_at) >= len(batch):
                rows.append(SamplingRow(0.0, 0, 1.0, 0.0, 0, 0, None))
                expected_rows.append(None)
                continue
            s, position = next(sequences, (None, None))
            if s is None:
                rows.append(SamplingRow(0.0, 0, 1.0, 0.0, 0, 0, None))
                expected_rows.append(None)
                continue
            row = s.row(position - s.known)
            rows.append(row)
            expected_rows.append((s, position))
        drawn = torch.randint(0, VOCAB, (len(rows),), generator=generator)
        device_logits, device_drawn = logits.clone().to(device), drawn.to(device)
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            applied = tracker.apply(device_logits, rows)
            tracker.record(rows if same_rows_list else list(rows), device_drawn)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        applied = applied.cpu()
        for r, item in enumerate(expected_rows):
            if item is None:
                assert torch.equal(applied[r], logits[r])
            else:
                s, position = item
                presence, frequency, repetition = s.params
                torch.testing.assert_close(applied[r], reference(logits[r], s.prompt, s.true_output(position),
                                                                  presence, frequency, repetition))
        for r, item in enumerate(expected_rows):
            if item is not None:
                s, position = item
                s.inflight = {p: t for p, t in s.inflight.items() if p < position}
                s.inflight[position] = int(drawn[r])
        # The host side between steps.
        for s in list(live):
            event = rand(10)
            if s.inflight and event < 5:  # the oldest draw lands on the host
                s.tokens.append(s.inflight.pop(s.known))
            elif s.inflight and event == 5:  # redrawn on the host: a different token, later draws dropped
                s.tokens.append((s.inflight[s.known] + 1) % VOCAB)
                s.inflight = {}
            elif event == 6:  # forced tokens: what was in flight is dropped
                s.tokens += [rand(VOCAB), rand(VOCAB)]
                s.inflight = {}
            elif event == 7 and rand(3) == 0:  # finished: its slot goes to a new sequence
                s.key.is_finished = True
                live.remove(s)
                live.append(new_sequence())
    assert len(tracker.states) + len(tracker.free) == tracker.counts.shape[0]


def test_the_callers_logits_are_left_as_they_were():
    """The engine reads the raw logits again after the draw (DeepConf's confidence): the
    penalized draw must not write them, fp32 logits included (`.float()` returns them)."""
    sampler = Sampler("cpu")
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    rows = [sampling_row(penalty_row(0, [1, 2, 3, 4], 2, 1.0, 1.0, 2.0), temperature=1.0),
            SamplingRow(0.0, 0, 1.0, 0.0, 0, 0, None)]
    sampler.draw(logits, rows)
    assert torch.equal(logits, before)


def test_a_second_draw_at_one_position_replaces_the_first():
    tracker = PenaltyTracker(torch.device("cpu"))
    tokens = [1, 2]
    rows = [sampling_row(penalty_row(0, tokens, 2, 0.0, 1.0, 1.0))]
    tracker.apply(torch.zeros(1, VOCAB), rows)
    tracker.record(rows, torch.tensor([7]))
    tracker.record(rows, torch.tensor([9]))  # drawn again before the next apply: only 9 counts
    counts = tracker.counts[tracker.states[0].slot]
    assert counts[9] == 1 and counts[7] == 0 and int(counts.sum()) == 1


def _device_work(function):
    """(aten ops, H2D transfers) that `function` issues, counted by the profiler and `_Staging.send`."""
    from thinkwise.engine import penalties

    sends = []
    original = penalties._Staging.send

    def counting(self, device):
        sends.append(len(self.parts))
        return original(self, device)

    penalties._Staging.send = counting
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            function()
    finally:
        penalties._Staging.send = original
    ops = [e.name for e in profile.events()
           if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return ops, sends


def test_a_step_costs_one_transfer_and_one_table_update_whatever_the_batch(monkeypatch):
    """Batch 32 at steady state, the async pattern (each draw lands on the host one step
    late): `apply` stages everything in one copy and updates the table with one index_add_;
    `record` (right after `apply`, the same rows) stages nothing and adds once; nothing per
    row reaches torch (no views of single tokens, no stacks, no per-row copies)."""
    from thinkwise.engine import penalties

    monkeypatch.setattr(penalties, "_penalize", lambda logits, *args: logits)  # the dense pass: not counted here
    tracker = PenaltyTracker(torch.device("cpu"))
    batch = 32
    keys = [_Sequence() for _ in range(batch)]
    histories = [[1, 2, 3] for _ in range(batch)]
    pending = None
    costs = []
    with torch.inference_mode():
        for step in range(5):
            rows = [SamplingRow(1.0, 0, 1.0, 0.0, i, 0, None, penalty=PenaltyRow(
                keys[i], i, 0.5, 0.5, 1.2, histories[i], 3, len(histories[i]) - 3 + (pending is not None)))
                for i in range(batch)]
            drawn = torch.randint(0, VOCAB, (batch,))
            applied = _device_work(lambda: tracker.apply(torch.zeros(batch, VOCAB), rows))
            recorded = _device_work(lambda: tracker.record(rows, drawn))
            costs.append((applied, recorded))
            if pending is not None:
                for i, token in enumerate(pending.tolist()):
                    histories[i].append(token)
            pending = drawn
    (apply_ops, apply_sends), (record_ops, record_sends) = costs[-1]
    assert len(apply_sends) == 1 and record_sends == []
    assert apply_ops.count("aten::index_add_") == 1 and record_ops.count("aten::index_add_") == 1
    assert len(apply_ops) <= 12 and len(record_ops) <= 6, (apply_ops, record_ops)
    # Nothing changed for the host since the last draw (no token landed, same rows): no transfer.
    with torch.inference_mode():
        tracker.apply(torch.zeros(batch, VOCAB), rows)
        quiet_ops, quiet_sends = _device_work(lambda: tracker.apply(torch.zeros(batch, VOCAB), rows))
    assert quiet_sends == [] and "aten::index_add_" not in quiet_ops


def test_staged_lists_come_back_whole_typed_and_16_byte_aligned():
    from thinkwise.engine.penalties import _Staging

    staging = _Staging()
    lists = [([3, -1, 2**40], torch.int64), ([0.5, -2.25, 1e-3], torch.float32), ([1, -1, 1, 7, 9], torch.int32),
             ([], torch.int64), ([5], torch.int64)]
    for values, dtype in lists:
        staging.add(values, dtype)
    staged = staging.send(torch.device("cpu"))
    base = staged[0].data_ptr()
    for (values, dtype), tensor in zip(lists, staged):
        assert tensor.dtype == dtype and tensor.tolist() == torch.tensor(values, dtype=dtype).tolist()
        assert (tensor.data_ptr() - base) % 16 == 0
