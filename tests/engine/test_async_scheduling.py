"""Async scheduling (a decode step launched behind the one in flight) changes nothing a
caller can see: every step returns the same events, outputs and token counts as the
synchronous engine, whatever primitives run between steps. Run on CPU, where the
engine takes the same code path (device-fed inputs, deferred read-back) without a GPU."""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.engine.step_pipeline import REDO_LIMIT
from tests.tiny_models import EOS_ID

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]
# On CUDA the pipelined steps are CUDA-graph replays fed on the device.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
on_every_device = pytest.mark.parametrize("device", DEVICES)


def pair(tiny_llama, device="cpu", **kwargs):
    directory, _ = tiny_llama
    settings = dict(dtype="float32", device=device, block_size=4, num_kv_blocks=256)
    settings.update(kwargs)
    sync = LLM(str(directory), async_scheduling=False, **settings)
    pipelined = LLM(str(directory), async_scheduling=True, **settings)
    assert not sync.engine.async_scheduling and pipelined.engine.async_scheduling
    return sync, pipelined


def visible(output):
    """What a caller sees of a finished request."""
    counts = output.counts
    return ([(o.index, o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in output.outputs],
            (counts.prompt_tokens_computed, counts.prompt_tokens_cached, counts.generated_tokens,
             counts.forced_tokens, counts.aborted_tokens))


def assert_idle(llm):
    engine = llm.engine
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


MIXED = [
    (PROMPT, SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)),
    ([256, 1, 2, 3], SamplingParams(temperature=0.8, seed=3, max_tokens=23)),  # may stop at EOS
    ([256] + list(range(30, 45)), SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=4, max_tokens=9)),
    ([256, 77, 78], SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=4)),  # drawn on the host
    ([256, 5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=14, min_tokens=6, stop_token_ids=[EOS_ID])),
    (PROMPT[:6], SamplingParams(n=3, temperature=1.0, seed=6, max_tokens=15, ignore_eos=True)),
]


@on_every_device
def test_mixed_batch_same_outputs_and_counts(tiny_llama, device):
    sync, pipelined = pair(tiny_llama, device)
    prompts, params = [p for p, _ in MIXED], [s for _, s in MIXED]
    expected = [visible(o) for o in sync.generate(prompts, params)]
    assert [visible(o) for o in pipelined.generate(prompts, params)] == expected
    # Once the host-drawn rows are done, the seeded and greedy rows run pipelined.
    assert pipelined.engine.pipeline.num_steps_behind >= 8 and sync.engine.pipeline.num_steps_behind == 0
    assert_idle(pipelined)


@on_every_device
def test_every_step_returns_the_same_events(tiny_llama, device):
    sync, pipelined = pair(tiny_llama, device)
    traces = []
    for llm in (sync, pipelined):
        engine = llm.engine
        for prompt, params in MIXED:
            engine.add_request(prompt, params)
        trace = []
        while engine.has_unfinished_requests():
            out = engine.step()
            trace.append(([(e.request_id, e.sample_index, e.token_ids, e.text, e.finish_reason) for e in out.events],
                          sorted(o.request_id for o in out.finished)))
        traces.append(trace)
    assert traces[0] == traces[1]
    assert pipelined.engine.pipeline.num_steps_behind >= 8


def test_a_step_really_runs_behind_the_one_in_flight(tiny_llama):
    _, pipelined = pair(tiny_llama)
    engine = pipelined.engine
    request = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # prefill: synchronous
    assert engine.pipeline.inflight is None
    engine.step()  # first decode: launched with the next one behind it
    seq = request.sequences[0]
    assert engine.pipeline.inflight is not None and seq.inflight is not None
    # The in-flight step already computes the last token's KV; the host has all tokens so far.
    assert seq.num_computed_tokens == seq.num_tokens and seq.num_output_tokens == 2
    while engine.has_unfinished_requests():
        engine.step()
    # A sequence that its next token ends for sure (max_tokens) gets no step behind it.
    assert seq.num_output_tokens == 8 and seq.num_computed_tokens == seq.num_tokens - 1
    assert_idle(pipelined)


def test_eos_finish_wastes_one_step_and_it_is_charged(tiny_llama):
    sync, pipelined = pair(tiny_llama)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=200)
    outs = [llm.generate([256, 1, 2, 3], params)[0] for llm in (sync, pipelined)]
    assert outs[0].outputs[0].finish_reason == "stop"  # the seed reaches EOS before the limit
    assert visible(outs[0]) == visible(outs[1])
    # The step launched behind the EOS token is real work, and its cost is reported.
    assert outs[1].counts.flops > outs[0].counts.flops
    assert_idle(pipelined)


@on_every_device
def test_primitives_between_steps(tiny_llama, device):
    """force_tokens, fork and abort_sequence while a step is in flight act on the
    sequence as the caller sees it, exactly as between two synchronous steps."""
    sync, pipelined = pair(tiny_llama, device)
    results = []
    for llm in (sync, pipelined):
        engine = llm.engine
        forced = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        forking = engine.add_request([256, 3, 4, 5], SamplingParams(temperature=1.0, seed=9, max_tokens=12,
                                                                    ignore_eos=True))
        aborted = engine.add_request([256, 40, 41], SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=30,
                                                                   ignore_eos=True))
        finished = []
        for _ in range(3):
            finished += engine.step().finished
        engine.force_tokens(forced.sequences[0], [65, 66, 67])
        engine.fork(forking.sequences[0], 2)
        engine.abort_sequence(aborted.sequences[1])
        for _ in range(2):
            finished += engine.step().finished
        engine.fork(forking.sequences[1], 1)  # a fork made at a boundary, forked again
        while engine.has_unfinished_requests():
            finished += engine.step().finished
        results.append(sorted((o.request_id, visible(o)) for o in finished))
        assert_idle(llm)
    assert results[0] == results[1]
    assert [len(o[1][0]) for o in results[1]] == [1, 4, 2]  # samples per request


@on_every_device
def test_top_p_wider_than_the_device_candidates_is_redrawn_exactly(tiny_llama, device, monkeypatch):
    """The device draw takes top-p from the top candidates; a row whose nucleus is wider is
    flagged and drawn exactly on the host next step, so the tokens equal the sync engine's."""
    from thinkwise.engine import sampler

    monkeypatch.setattr(sampler, "_TOP_P_CANDIDATES", 4)  # the tiny vocabulary is < 1,024
    sync, pipelined = pair(tiny_llama, device)
    prompts = [PROMPT, [256, 1, 2, 3], [256, 50] * 4]
    params = [SamplingParams(temperature=t, top_p=p, seed=s, max_tokens=20, ignore_eos=True)
              for t, p, s in ((1.5, 0.9, 1), (0.3, 0.95, 2), (1.0, 1.0, 3))]
    expected = [visible(o) for o in sync.generate(prompts, params)]
    assert [visible(o) for o in pipelined.generate(prompts, params)] == expected
    engine = pipelined.engine
    assert engine.pipeline.num_host_redraws > 0 and engine.pipeline.num_steps_behind > 0
    # So many redos: top-p rows went back to host draws instead of redoing every step.
    assert engine.pipeline.top_p_on_host_until > 0 and engine.pipeline.num_host_redraws <= 2 * REDO_LIMIT
    assert_idle(pipelined)


def test_thinking_budget_forced_inside_the_pipeline(tiny_llama):
    sync, pipelined = pair(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, thinking_budget=7, answer_prefix="A:")
    outs = [visible(llm.generate(PROMPT, params)[0]) for llm in (sync, pipelined)]
    assert outs[0] == outs[1] and outs[0][1][3] > 0  # forced tokens


@on_every_device
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_and_prefix_cache(tiny_llama, prefix_caching, device):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    prompts = [PROMPT, [256, 1, 2, 3], [256] + list(range(30, 45)), [256, 77, 78], PROMPT]
    roomy, _ = pair(tiny_llama, device, enable_prefix_caching=prefix_caching)
    _, tight = pair(tiny_llama, device, num_kv_blocks=20, enable_prefix_caching=prefix_caching)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert_idle(tight)
    # And a second round reuses cached prefixes written while steps were in flight.
    again = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in again] == expected
    cached = sum(o.counts.prompt_tokens_cached for o in again)
    assert cached > 0 if prefix_caching else cached == 0


def test_abort_whole_request_mid_flight(tiny_llama):
    _, pipelined = pair(tiny_llama)
    engine = pipelined.engine
    request = engine.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=50))
    other = engine.add_request([256, 9, 9], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.pipeline.inflight is not None
    output = engine.abort(request.request_id)
    assert all(o.finish_reason == "abort" for o in output.outputs)
    assert output.counts.aborted_tokens == sum(len(o.token_ids) for o in output.outputs)
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step().finished
    assert [o.request_id for o in finished] == [other.request_id]
    sync_out = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256,
                   async_scheduling=False).generate([256, 9, 9], SamplingParams(temperature=0, max_tokens=10,
                                                                                ignore_eos=True))[0]
    assert finished[0].outputs[0].token_ids == sync_out.outputs[0].token_ids
    assert_idle(pipelined)
