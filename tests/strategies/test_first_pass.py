"""first-pass@k: the rest aborted the moment one sample passes; none passing; no verifier."""

from __future__ import annotations

import asyncio

import pytest

from tests.strategies.test_controllers import ScriptedGroup
from thinkwise import LLM, SamplingParams
from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import LocalBackend, parse_strategy, run_strategy
from thinkwise.tasks.verifiers import ExactChecker

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]
STOPS = list(range(60, 110))


class ScriptedBackend:
    intensity, cost_basis, is_local = 0.0, "engine", True

    def __init__(self, group):
        self.group = group

    async def start(self, prompt, params):
        assert params.n == self.group.k
        return self.group


class Verifier:
    def __init__(self, passing: set[str]):
        self.passing = passing
        self.scored: list[str] = []

    def score(self, prompt, completion, answer):
        self.scored.append(completion)
        return 1.0 if completion in self.passing else 0.0


def run(backend, strategy: str, verifier, params=None):
    return asyncio.run(run_strategy(backend, parse_strategy(strategy), PROMPT, params or SamplingParams(),
                                    extract=lambda t: t or None, verifier=verifier))


def test_aborts_the_rest_on_the_exact_step_one_passes():
    # Step 1: sample 0 finishes with "a" (fails). Step 2: sample 2 finishes with "b" (passes).
    group = ScriptedGroup(4, [[(0, "stop", "a"), (1, None, "x")], [(2, "stop", "b"), (1, None, "x")],
                              [(1, "stop", "b"), (3, "stop", "b")]])
    verifier = Verifier({"b"})
    answer = run(ScriptedBackend(group), "first-pass@4", verifier)
    assert group.aborted_after_step == 2 and group.abort_calls == 1
    assert verifier.scored == ["a", "b"]  # scored as they finished, nothing after the pass
    assert answer.answer == "b" and answer.text == "b" and answer.samples[2].score == 1.0
    assert [s.finish_reason for s in answer.samples] == ["stop", "abort", "stop", "abort"]
    assert answer.cost.aborted_samples == 2


def test_none_passing_runs_all_and_returns_the_best_score():
    group = ScriptedGroup(3, [[(0, "stop", "a")], [(1, "stop", "bb")], [(2, "stop", "c")]])
    answer = run(ScriptedBackend(group), "first-pass@3", Verifier(set()))
    assert group.abort_calls == 0 and answer.cost.aborted_samples == 0
    assert all(s.score == 0.0 for s in answer.samples)
    assert answer.answer is not None


def test_without_a_verifier_it_is_refused():
    group = ScriptedGroup(2, [[(0, "stop", "a")]])
    with pytest.raises(InvalidParameterError, match="first-pass@K needs a verifier") as error:
        run(ScriptedBackend(group), "first-pass@2", None)
    assert error.value.param == "verifier"


def test_on_the_engine_the_rest_is_aborted_and_freed(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    engine = AsyncEngine(llm.engine).start()
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, stop_token_ids=STOPS, ignore_eos=True)

    class AnyFinished:
        def score(self, prompt, completion, answer):
            return 1.0

    try:
        backend = LocalBackend(engine)
        majority = asyncio.run(run_strategy(backend, parse_strategy("majority@8"), PROMPT, params))
        first = asyncio.run(run_strategy(backend, parse_strategy("first-pass@8"), PROMPT, params,
                                         verifier=AnyFinished()))
    finally:
        engine.shutdown()
    passed = [s for s in first.samples if s.score == 1.0]
    aborted = [s for s in first.samples if s.finish_reason == "abort"]
    assert len(passed) == 1 and aborted and all("passed the verifier" in s.abort_reason for s in aborted)
    # The first to finish passed: the shortest finished chain of the same seeds.
    shortest = min((s for s in majority.samples if s.finish_reason == "stop"), key=lambda s: s.num_tokens)
    assert passed[0].text == shortest.text
    assert first.cost.decode_tokens < majority.cost.decode_tokens
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_exact_checker_works_as_the_verifier():
    group = ScriptedGroup(3, [[(0, "stop", "12")], [(1, "stop", "7")], [(2, "stop", "7")]])
    answer = run(ScriptedBackend(group), "first-pass@3", ExactChecker("7"))
    assert answer.answer == "7" and group.aborted_after_step == 2
