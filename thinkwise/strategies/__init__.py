"""Test-time strategies as engine primitives, and one entry point to run any of them.

`parse_strategy` turns a name such as "majority@8", "short-3@8", "short-m@k" (with k and
m given separately), "best-of-8", "weighted-best-of-8", "adaptive:16", "budget:512" or
"greedy" into a `StrategySpec`; `run_strategy` runs a spec for one prompt on a backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies.base import (
    Answer, LocalBackend, SampleOutcome, StrategyCost, Stopwatch, sample_to_completion,
)
from thinkwise.tasks.extraction import extract_answer

__all__ = ["Answer", "SampleOutcome", "StrategyCost", "StrategySpec", "parse_strategy", "run_strategy", "LocalBackend"]

STRATEGY_HELP = ("greedy, majority@K, short-M@K (or short-m@k with --k/--m), best-of-K, weighted-best-of-K, "
                 "adaptive:MAX (rounds of 4), budget:TOKENS")


@dataclass
class StrategySpec:
    kind: str  # greedy | majority | short | best_of_n | weighted_best_of_n | adaptive | budget
    k: int = 1
    m: int = 1
    budget: int = 0
    round_size: int = 4
    threshold: float = 0.95
    min_thinking_tokens: int = 0


def parse_strategy(name: str, *, k: int | None = None, m: int | None = None, budget: int | None = None) -> StrategySpec:
    """Parse a strategy name; explicit k/m/budget fill the placeholders (k, m) in the name."""
    text = name.strip().lower()

    def number(value: str, given: int | None, what: str) -> int:
        if value in ("k", "m", "n", ""):
            if given is None:
                raise InvalidParameterError(f"strategy {name!r} needs {what}; pass it (e.g. --{what} 8)", param=what)
            return given
        return int(value)

    if text == "greedy":
        return StrategySpec("greedy")
    if match := re.fullmatch(r"(?:majority|maj|self-consistency)@(\w*)", text):
        return StrategySpec("majority", k=number(match[1], k, "k"))
    if match := re.fullmatch(r"short-(\w+)@(\w+)", text):
        spec = StrategySpec("short", k=number(match[2], k, "k"), m=number(match[1], m, "m"))
        if not 1 <= spec.m <= spec.k:
            raise InvalidParameterError(f"short-m@k needs 1 <= m <= k, got m={spec.m}, k={spec.k}", param="m")
        return spec
    if match := re.fullmatch(r"(weighted-)?best-of-(\w+)", text):
        kind = "weighted_best_of_n" if match[1] else "best_of_n"
        return StrategySpec(kind, k=number(match[2], k, "k"))
    if match := re.fullmatch(r"adaptive(?::(\d+))?", text):
        return StrategySpec("adaptive", k=number(match[1] or "", k, "k"))
    if match := re.fullmatch(r"budget(?::(\d+))?", text):
        return StrategySpec("budget", k=k or 1, budget=number(match[1] or "", budget, "budget"))
    raise InvalidParameterError(f"unknown strategy {name!r}; known: {STRATEGY_HELP}", param="strategy")


async def run_strategy(
    backend: LocalBackend,
    spec: StrategySpec,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    prompt_text: str = "",
    extract: str | Callable[[str], str | None] = "auto",
    verifier=None,
) -> Answer:
    """Run one strategy; `extract` is a method name of `extract_answer` or a callable
    (e.g. a task family's canonical-answer extractor) mapping a sample's text to its vote.
    `backend` is a `LocalBackend` (prompt: token ids) or a `remote.RemoteBackend` (prompt:
    chat messages, text or token ids); the Answer's `cost_basis` says which counted the cost."""
    answer = await _run(backend, spec, prompt_ids, params, prompt_text, extract, verifier)
    answer.cost_basis = getattr(backend, "cost_basis", "engine")
    return answer


async def _run(backend, spec: StrategySpec, prompt_ids, params: SamplingParams, prompt_text: str, extract,
               verifier) -> Answer:
    from thinkwise.strategies import best_of_n, budget, voting

    extractor = extract if callable(extract) else partial(extract_answer, method=extract)
    if spec.kind == "greedy":
        clock = Stopwatch()
        samples, cost = await sample_to_completion(backend, prompt_ids, replace(params, n=1, temperature=0.0), extractor)
        cost.wall_time_s = clock.seconds()
        sample = samples[0]
        return Answer("greedy", sample.answer, sample.text, {sample.answer: 1.0} if sample.answer else {}, samples, cost)
    if spec.kind == "majority":
        return await voting.majority(backend, prompt_ids, params, spec.k, extractor)
    if spec.kind == "short":
        return await voting.short_m_of_k(backend, prompt_ids, params, spec.k, spec.m, extractor)
    if spec.kind == "adaptive":
        return await voting.adaptive(backend, prompt_ids, params, spec.k, extractor, spec.round_size, spec.threshold)
    if spec.kind in ("best_of_n", "weighted_best_of_n"):
        if verifier is None:
            raise InvalidParameterError("best-of-n needs a verifier (an exact checker, code tests or a reward model)",
                                        param="verifier")
        return await best_of_n.best_of_n(backend, prompt_ids, prompt_text, params, spec.k, verifier, extractor,
                                         weighted=spec.kind == "weighted_best_of_n")
    if spec.kind == "budget":
        return await budget.thinking_budget(backend, prompt_ids, params, spec.budget, extractor,
                                            min_tokens=spec.min_thinking_tokens, k=spec.k)
    raise InvalidParameterError(f"unknown strategy kind {spec.kind!r}", param="strategy")
