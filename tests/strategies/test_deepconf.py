"""DeepConf: confidence on the device, offline filtering and weighting, online stopping on a tiny Qwen3.

The online test scripts the logits each sample sees (`ScriptedLogitsSampler`): warm-up
traces and "sure" later traces are peaked (high confidence) and end on EOS; "doubtful"
later traces see a flat top-20 (confidence log 20) and would run to max_tokens. The
controller must stop the doubtful ones once a window is full, free their blocks at once,
and stop the rest when the weighted vote passes tau.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from tests.strategies.scripted_logits import ScriptedLogitsSampler, peaked_confidence
from tests.tiny_models import EOS_ID, make_tiny_model
from thinkwise import LLM, SamplingParams
from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.engine.sampler import Sampler, SamplingRow
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import LocalBackend, parse_strategy, run_strategy
from thinkwise.strategies.base import SampleOutcome
from thinkwise.strategies.deepconf import (
    WindowTracker, group_confidences, keep_top, percentile, trace_score, weighted_vote,
)

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]
SEED = 5


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen3-deepconf")
    make_tiny_model("qwen3", directory, seed=3)
    return directory


def row(k: int = 0, **kw) -> SamplingRow:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1, position=0, logprobs=None, confidence_k=k)
    base.update(kw)
    return SamplingRow(**base)


# ---------------------------------------------------------------------- the sampler's confidence
def test_confidence_is_minus_the_mean_top_k_logprob_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    conf = Sampler.confidence(logits, [row(20), row(0), row(5)])
    reference = torch.log_softmax(logits, dim=-1).topk(20, dim=-1).values
    assert conf[0].item() == pytest.approx(-reference[0].mean().item(), rel=1e-6)
    assert math.isnan(conf[1].item())  # that row asked for none
    assert conf[2].item() == pytest.approx(-reference[2, :5].mean().item(), rel=1e-6)
    assert Sampler.confidence(logits, [row(0)] * 3) is None
    # The synchronous call returns the same values with the tokens, before any bans are applied.
    drawn = Sampler("cpu")(logits.clone(), [row(20), row(0), row(5, banned_token_ids=(1, 2))])
    assert drawn.confidence[0] == pytest.approx(conf[0].item(), rel=1e-6)
    assert drawn.confidence[2] == pytest.approx(conf[2].item(), rel=1e-6)


def test_confidence_parameter_is_validated():
    for bad in (-1, 1025, 2.5, True):
        with pytest.raises(InvalidParameterError, match="confidence_top_k"):
            SamplingParams(confidence_top_k=bad)


# ---------------------------------------------------------------------- scores, filters, votes
def test_group_confidence_slides_over_the_last_w_tokens():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert group_confidences(values, 2) == [1.5, 2.5, 3.5, 7.0]
    assert group_confidences(values, 10) == [4.0]  # shorter than a window: one group
    assert trace_score(values, 2, "lowest") == 1.5
    assert trace_score(values, 2, "tail") == 7.0
    assert trace_score(values, 2, "mean") == 4.0
    assert trace_score(values, 2, "bottom10") == 1.5  # ceil(10% of 4 groups) = 1 group
    assert trace_score([float("nan"), 2.0], 4) == 2.0  # tokens without a confidence are skipped
    assert trace_score([], 4) is None
    tracker = WindowTracker(2)
    levels = [tracker.add(v) for v in values]
    assert levels == [None, 1.5, 2.5, 3.5, 7.0] and tracker.lowest == 1.5


def test_percentile_matches_numpy_linear():
    values = [5.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 10) == pytest.approx(1.3)


def outcome(index: int, answer: str, score: float, tokens: int = 10) -> SampleOutcome:
    return SampleOutcome(index=index, text=answer, answer=answer, num_tokens=tokens, finish_reason="stop",
                         score=score)


def test_offline_keeps_the_top_eta_percent_and_weights_by_confidence():
    # Four confident "7"s lose to... nothing: but three barely-confident "9"s outnumber two "7"s.
    samples = [outcome(0, "7", 10.0), outcome(1, "7", 9.0), outcome(2, "9", 2.0), outcome(3, "9", 1.5),
               outcome(4, "9", 1.0)]
    # eta = 100 keeps all: the weighted vote (19 vs 4.5) picks 7, although 9 has more votes.
    chosen, votes = weighted_vote(keep_top(samples, 100))
    assert chosen.answer == "7" and votes == {"7": 19.0, "9": 4.5}
    # eta = 40 keeps the top 2 traces (ceil(0.4 * 5)): both 7s.
    assert [s.index for s in keep_top(samples, 40)] == [0, 1]
    # eta = 10 keeps at least one.
    assert [s.index for s in keep_top(samples, 10)] == [0]
    # Ties in weight go to the answer with more traces; its most confident trace represents it.
    chosen, _ = weighted_vote([outcome(0, "a", 2.0), outcome(1, "b", 1.0), outcome(2, "b", 1.0)])
    assert chosen.answer == "b"


def test_offline_on_scripted_groups_filters_and_weights():
    from tests.strategies.test_controllers import ScriptedGroup

    class ConfidentGroup(ScriptedGroup):
        def __init__(self, k, script, confidences):
            super().__init__(k, script)
            self.token_confidences = confidences

    class Backend:
        intensity, cost_basis, is_local = 0.0, "engine", True

        async def start(self, prompt, params):
            assert params.confidence_top_k == 20 and params.n == 4
            # Samples answer a, a, b, b; the b's are far more confident.
            return ConfidentGroup(4, [[(0, "stop", "a"), (1, "stop", "a"), (2, "stop", "b"), (3, "stop", "b")]],
                                  [[1.0, 1.0], [1.0, 0.5], [5.0, 6.0], [4.0, 8.0]])

    spec = parse_strategy("deepconf@4(eta=50, window=2)")
    answer = asyncio.run(run_strategy(Backend(), spec, [1], SamplingParams(), extract=lambda t: t or None))
    assert answer.answer == "b" and answer.votes == {"b": 5.5 + 6.0}
    assert [s.score for s in answer.samples] == [1.0, 0.75, 5.5, 6.0]


# ---------------------------------------------------------------------- online, on the engine
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_online_stops_doubtful_traces_and_the_group_at_consensus(tiny_qwen3, async_scheduling):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512,
              async_scheduling=async_scheduling)
    tok = llm.tokenizer
    A, B, C, filler = (tok.convert_tokens_to_ids(c) for c in ("A", "B", "C", "a"))
    sampler = ScriptedLogitsSampler(llm.engine.sampler, llm.engine.model_config.vocab_size)
    llm.engine.sampler = sampler

    def trace(token: int, spread: float, length: int):
        return lambda position: (EOS_ID if position >= length else token, spread)

    def doubtful(position):
        return filler, None  # a flat top 20, never EOS

    # Warm-up (seed SEED): three traces answering A, B, C with spreads 34, 33, 30.
    sampler.script(SEED, [0], trace(A, 34, 6))
    sampler.script(SEED, [1], trace(B, 33, 6))
    sampler.script(SEED, [2], trace(C, 30, 6))
    later = SEED + 1_000_003
    sampler.script(later, [0, 1], doubtful)
    sampler.script(later, [2], trace(A, 40, 10))
    sampler.script(later, [3, 4], trace(A, 40, 30))
    engine = AsyncEngine(llm.engine).start()
    bm = llm.engine.block_manager
    try:
        backend = LocalBackend(engine)
        spec = parse_strategy("deepconf-online@8(warmup=3, eta=90, tau=0.65, window=4)")
        params = SamplingParams(temperature=1.0, seed=SEED, max_tokens=60)
        answer = asyncio.run(run_strategy(backend, spec, PROMPT, params, extract=lambda t: t[:1] or None))
    finally:
        engine.shutdown()
    # Under async scheduling the confidences rode the pipelined read-back (steps launched behind).
    assert (llm.engine.pipeline.num_steps_behind > 0) == async_scheduling
    warm, late = answer.samples[:3], answer.samples[3:]
    # The threshold: the 10th percentile of the warm-up scores (0.95 x spread each).
    scores = [peaked_confidence(s) for s in (34, 33, 30)]
    threshold = percentile(scores, 10)
    assert [s.score for s in warm] == pytest.approx(scores, rel=1e-4)
    # Doubtful traces were stopped once a window filled, far before max_tokens (60); the
    # controller acts between steps, a few steps behind the engine on a busy CPU.
    for s in late[:2]:
        assert s.finish_reason == "abort" and "below the warm-up threshold" in s.abort_reason
        assert 4 <= s.num_tokens <= 24
        assert s.score < threshold
    # The first sure trace finished; with it the vote's leader passed tau and the rest stopped.
    assert late[2].finish_reason == "stop" and late[2].answer == "A"
    for s in late[3:5]:
        assert s.finish_reason == "abort" and "tau=0.65" in s.abort_reason and s.num_tokens < 30
    assert answer.answer == "A"
    # A (warm-up 34 + sure 40) against B (33); C scored below the threshold and does not vote.
    assert answer.votes == pytest.approx({"A": peaked_confidence(34) + peaked_confidence(40),
                                          "B": peaked_confidence(33)}, rel=1e-4)
    assert answer.cost.aborted_samples == 4 and answer.cost.requests == 2
    # Every block is back, and the decode count is every sampled token (aborted ones included).
    assert bm.num_free_blocks == bm.num_blocks
    assert answer.cost.decode_tokens == sum(s.num_tokens for s in answer.samples)


def test_online_frees_a_stopped_trace_s_blocks_at_once(tiny_qwen3):
    """When the controller aborts a trace, the sequence holds no block by the next engine command."""
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    filler, A, B = (llm.tokenizer.convert_tokens_to_ids(c) for c in ("a", "A", "B"))
    sampler = ScriptedLogitsSampler(llm.engine.sampler, llm.engine.model_config.vocab_size)
    llm.engine.sampler = sampler
    sampler.script(SEED, [0], lambda p: (EOS_ID if p >= 4 else A, 30))
    sampler.script(SEED, [1], lambda p: (EOS_ID if p >= 4 else B, 30))  # a split vote: the later trace runs
    sampler.script(SEED + 1_000_003, [0], lambda p: (filler, None))
    engine = AsyncEngine(llm.engine).start()
    held: list[int] = []

    class Watching(LocalBackend):
        async def start(self, prompt, params):
            group = await super().start(prompt, params)
            original = group.abort_sample

            async def abort_sample(index, reason):
                sequences = await engine.call(lambda e: [s for s in e.requests[group.request_id].sequences
                                                         if s.sample_index == index])
                assert sequences and sequences[0].block_table  # it held blocks until now
                await original(index, reason)
                held.append(await engine.call(lambda e: sum(len(s.block_table) for s in sequences)))

            group.abort_sample = abort_sample
            return group

    try:
        spec = parse_strategy("deepconf-online@3(warmup=2, window=3, tau=1)")
        answer = asyncio.run(run_strategy(Watching(engine), spec, PROMPT,
                                          SamplingParams(temperature=1.0, seed=SEED, max_tokens=50),
                                          extract=lambda t: t[:1] or None))
    finally:
        engine.shutdown()
    assert held == [0]  # aborted once, and its blocks were already free
    assert answer.samples[2].finish_reason == "abort" and answer.samples[2].num_tokens < 10


@pytest.mark.parametrize("text, field", [
    ("deepconf@8(eta=0)", "eta"), ("deepconf@8(eta=101)", "eta"), ("deepconf-online@8(tau=1.5)", "tau"),
    ("deepconf-online@8(tau=0)", "tau"), ("deepconf@8(window=0)", "window"), ("deepconf-online@8(warmup=8)", "warmup"),
    ("deepconf-online@8(warmup=0)", "warmup"), ("deepconf@8(confidence_k=0)", "confidence_k"),
    ("deepconf@8(score=median)", "score"), ("deepconf-online@1", "k"), ("deepconf@8(eta=nan)", "eta"),
    ("deepconf@8(eta=inf)", "eta"), ("deepconf-online@8(score=lowest)", "score"),
])
def test_out_of_range_parameters_name_the_field(text, field):
    with pytest.raises(InvalidParameterError) as error:
        parse_strategy(text)
    assert error.value.param == field and field in error.value.message


def test_defaults_follow_the_paper():
    spec = parse_strategy("deepconf-online@64")
    assert (spec.eta, spec.tau, spec.window, spec.confidence_k, spec.warmup) == (90.0, 0.95, 2048, 20, 16)
    assert parse_strategy("deepconf-online@8").warmup == 2  # min(16, k / 4)
    assert parse_strategy("deepconf@8").score == "lowest"
