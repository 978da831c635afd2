"""Output processing on its own: the stop rules in order, the bans that keep the sampler from
drawing what the rules would not yet accept, and the thinking budget. No model runs: the
processor only needs sequences and the engine's finish/force hooks."""

from __future__ import annotations

from thinkwise.engine.output_processor import OutputProcessor, StepOutput
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import Request, Sequence, SequenceStatus

EOS = 2
PROMPT = [10, 11, 12]


def make(params: SamplingParams, thinking=None, max_model_len=100):
    finished, forced = [], []

    def finish(seq, reason, stop_reason=None):
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        finished.append((seq.seq_id, reason, stop_reason))

    def force(seq, ids):
        seq.token_ids.extend(ids)
        forced.append(list(ids))

    requests = {}
    processor = OutputProcessor(eos_token_ids={EOS}, max_model_len=max_model_len, requests=requests,
                                finish=finish, force_tokens=force)
    request = Request("r", None, PROMPT, params)
    request.thinking = thinking
    seq = Sequence(request, PROMPT, len(PROMPT), 0, seed=1)
    seq.max_tokens = params.max_tokens
    request.sequences.append(seq)
    requests["r"] = request
    return processor, seq, finished, forced


def test_eos_and_stop_tokens_are_banned_before_min_tokens_then_end_the_sample():
    processor, seq, finished, _ = make(SamplingParams(min_tokens=2, stop_token_ids=[7], max_tokens=10))
    assert set(processor.sampling_row(seq).banned_token_ids) == {EOS, 7}
    assert set(processor.sampling_row(seq, ahead=2).banned_token_ids) == set()  # a step in flight counts
    processor.append_token(seq, 5, None)
    assert set(processor.sampling_row(seq).banned_token_ids) == {EOS, 7}
    event = processor.append_token(seq, 7, None)  # the 2nd token: min_tokens reached, stop token 7 ends it
    assert event.finish_reason == "stop" and finished == [(seq.seq_id, "stop", 7)]


def test_eos_before_min_tokens_does_not_stop_and_ignore_eos_never_bans_it():
    processor, seq, finished, _ = make(SamplingParams(min_tokens=3, max_tokens=10))
    processor.append_token(seq, EOS, None)
    assert finished == []
    processor, seq, _, _ = make(SamplingParams(min_tokens=3, ignore_eos=True, max_tokens=10))
    assert processor.sampling_row(seq).banned_token_ids == ()


def test_eos_outranks_the_length_limit_and_the_context_limit_ends_a_sample():
    processor, seq, finished, _ = make(SamplingParams(max_tokens=1))
    processor.append_token(seq, EOS, None)
    assert finished == [(seq.seq_id, "stop", None)]
    processor, seq, finished, _ = make(SamplingParams(max_tokens=None), max_model_len=len(PROMPT) + 2)
    processor.append_token(seq, 5, None)
    processor.append_token(seq, 6, None)
    assert finished == [(seq.seq_id, "length", None)]


def test_thinking_marker_is_noted_or_forced_at_the_budget():
    end, forced_ids = [9], [9, 40, 41]
    params = SamplingParams(max_tokens=20, thinking_budget=3, min_thinking_tokens=2)
    processor, seq, _, forced = make(params, thinking=(end, forced_ids))
    assert 9 in processor.sampling_row(seq).banned_token_ids  # not before min_thinking_tokens
    for token in (5, 6):
        processor.append_token(seq, token, None)
    assert 9 not in processor.sampling_row(seq).banned_token_ids
    event = processor.append_token(seq, 7, None)  # the budget: the marker and the answer prefix are forced
    assert forced == [forced_ids] and event.token_ids == [7] + forced_ids and seq.thinking_tokens == 3
    processor, seq, _, forced = make(params, thinking=(end, forced_ids))
    for token in (5, 6, 9):  # the model closes its thinking itself
        processor.append_token(seq, token, None)
    assert forced == [] and seq.thinking_tokens == 2


def test_a_finished_request_is_finalized_once_and_leaves_the_table():
    processor, seq, _, _ = make(SamplingParams(max_tokens=1))
    result_events = processor.append_token(seq, 5, None)
    assert result_events.finish_reason == "length"
    result = StepOutput()
    processor.settle([seq], result)
    assert [o.request_id for o in result.finished] == ["r"] and processor.requests == {}
    assert result.finished[0].outputs[0].token_ids == [5] and "finish_time" in result.finished[0].metrics
