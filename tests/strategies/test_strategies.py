"""Strategy controllers on a tiny model: votes, early aborts, adaptive stopping, budgets, cost."""

from __future__ import annotations

import asyncio

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.strategies import LocalBackend, parse_strategy, run_strategy
from thinkwise.strategies import best_of_n, voting
from thinkwise.errors import InvalidParameterError

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]
# Ending on any of these common byte tokens gives samples of varied, short lengths.
STOPS = list(range(60, 110))


def first_char(text: str) -> str | None:
    """A stand-in answer for random-weight text: its first character."""
    return text[:1] or None


@pytest.fixture()
def setup(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    engine = AsyncEngine(llm.engine).start()
    yield llm, LocalBackend(engine)
    engine.shutdown()


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, seed=11, max_tokens=40, stop_token_ids=STOPS, ignore_eos=True)
    base.update(kw)
    return SamplingParams(**base)


def run(coro):
    return asyncio.run(coro)


def test_majority_is_the_plurality_of_its_own_finished_samples(setup):
    llm, backend = setup
    answer = run(voting.majority(backend, PROMPT, params(), 8, first_char))
    finished = [s for s in answer.samples if s.finish_reason == "stop"]
    assert len(answer.samples) == 8 and finished
    tally: dict[str, int] = {}
    for s in finished:
        tally[s.answer] = tally.get(s.answer, 0) + 1
    assert answer.votes == {a: float(c) for a, c in tally.items()}
    assert tally[answer.answer] == max(tally.values())
    # Every token the strategy reports is one the engine computed.
    assert answer.cost.decode_tokens == sum(s.num_tokens for s in answer.samples)
    assert answer.cost.prompt_tokens_computed + answer.cost.prompt_tokens_cached == len(PROMPT)


def test_short_m_of_k_aborts_the_rest_and_spends_fewer_tokens(setup):
    llm, backend = setup
    majority = run(voting.majority(backend, PROMPT, params(), 8, first_char))
    short = run(voting.short_m_of_k(backend, PROMPT, params(), 8, 2, first_char))
    # Aborted samples' blocks are free right after the answer.
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    aborted = [s for s in short.samples if s.finish_reason == "abort"]
    assert aborted and all("short-2@8" in s.abort_reason for s in aborted)
    assert short.cost.aborted_samples == len(aborted)
    assert short.cost.decode_tokens < majority.cost.decode_tokens
    assert short.cost.decode_tokens == sum(s.num_tokens for s in short.samples)
    # It votes among the first two to finish: the two shortest finished chains (same seeds,
    # so the same samples as majority's, cut short).
    finished = sorted((s for s in majority.samples if s.finish_reason == "stop"), key=lambda s: s.num_tokens)
    assert sum(short.votes.values()) == 2
    assert short.answer in {s.answer for s in finished[:2]}


def test_short_1_takes_the_first_to_finish(setup):
    llm, backend = setup
    answer = run(voting.short_m_of_k(backend, PROMPT, params(), 6, 1, first_char))
    winners = [s for s in answer.samples if s.finish_reason == "stop"]
    shortest = min(winners, key=lambda s: s.num_tokens)
    assert answer.votes == {shortest.answer: 1.0} and answer.text == shortest.text


def test_adaptive_stops_after_a_unanimous_first_round(setup):
    llm, backend = setup
    unanimous = run(voting.adaptive(backend, PROMPT, params(temperature=0.0), 16, first_char, round_size=4))
    assert unanimous.cost.samples == 4 and unanimous.cost.requests == 1
    assert len(set(s.answer for s in unanimous.samples)) == 1
    # The second round's prompt comes from the prefix cache.
    spread = run(voting.adaptive(backend, PROMPT, params(temperature=1.5, seed=3), 12,
                                 lambda t: t[:3] or None, round_size=4))
    assert spread.cost.samples > 4 and spread.cost.prompt_tokens_cached > 0


def test_leader_is_decided():
    assert voting.leader_is_decided([5, 0], remaining=4, threshold=0.99)  # cannot be overtaken
    assert voting.leader_is_decided([4], remaining=12, threshold=0.95)  # posterior 1 - 2^-5
    assert not voting.leader_is_decided([2, 2], remaining=12, threshold=0.95)


def test_best_of_n_picks_the_top_score(setup):
    llm, backend = setup

    class LengthVerifier:
        def score(self, prompt, completion, answer):
            return float(len(completion))

    answer = run(best_of_n.best_of_n(backend, PROMPT, "", params(), 5, LengthVerifier(), first_char))
    best = max(answer.samples, key=lambda s: s.score)
    assert answer.text == best.text and all(s.score is not None for s in answer.samples)
    weighted = run(best_of_n.best_of_n(backend, PROMPT, "", params(), 5, LengthVerifier(), first_char, weighted=True))
    totals: dict[str, float] = {}
    for s in weighted.samples:
        if s.answer is not None:
            totals[s.answer] = totals.get(s.answer, 0.0) + s.score
    assert weighted.answer == max(totals, key=totals.get)


def test_thinking_budget_forces_the_marker_on_the_exact_token(setup):
    llm, backend = setup
    spec = parse_strategy("budget:12")
    answer = run(run_strategy(backend, spec, PROMPT, SamplingParams(temperature=1.0, seed=2, ignore_eos=True),
                              extract="auto"))
    sample = answer.samples[0]
    forced = llm.tokenizer.encode("</think>\nFinal answer: ", add_special_tokens=False)
    assert answer.cost.forced_tokens == len(forced)
    assert "</think>\nFinal answer: " in sample.text
    # With a minimum, the single-token marker requirement is checked up front.
    with pytest.raises(InvalidParameterError, match="one token"):
        llm.generate(PROMPT, SamplingParams(thinking_budget=20, min_thinking_tokens=5))


def test_thinking_budget_token_positions(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, thinking_budget=7,
                                              answer_prefix="A:"))[0]
    forced = llm.tokenizer.encode("</think>A:", add_special_tokens=False)
    assert out.outputs[0].token_ids[7 : 7 + len(forced)] == forced
    assert out.counts.forced_tokens == len(forced)


def test_strategy_names_parse_and_bad_ones_are_explained():
    assert parse_strategy("short-m@k", k=8, m=3).k == 8
    assert parse_strategy("short-3@8").m == 3
    assert parse_strategy("majority@16").k == 16
    assert parse_strategy("adaptive:16").k == 16
    assert parse_strategy("budget:512").budget == 512
    with pytest.raises(InvalidParameterError, match="known"):
        parse_strategy("telepathy@3")
    with pytest.raises(InvalidParameterError, match="m <= k"):
        parse_strategy("short-9@8")
    with pytest.raises(InvalidParameterError, match="needs k"):
        parse_strategy("majority@k")


def test_solve_runs_concurrently_with_plain_requests(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    answers = llm.solve_many([PROMPT, PROMPT[:5]], "short-2@4", sampling_params=params(), extract="last_number")
    assert len(answers) == 2 and all(a.strategy == "short-2@4" for a in answers)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
