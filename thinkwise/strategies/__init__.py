"""Test-time strategies as engine primitives, and one entry point to run any of them.

Each strategy module registers itself in `registry` (name pattern, parameters, help,
runner). `parse_strategy` turns a string such as "majority@8", "short-3@8", "short-m@k"
(with k and m given separately), "best-of-8", "adaptive:16(round_size=2)", "budget:512",
"deepconf@16(eta=10)", "deepconf-online@32", "probe:32", "probe-majority@8",
"first-pass@8" or "greedy" into a `StrategySpec`; `run_strategy` runs a spec for one
prompt on a backend. `STRATEGY_HELP` lists them all; docs/extending_strategies.md says how
to add one.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from thinkwise.engine.sampling_params import SamplingParams
# Imported for their registrations, in the order help lists them.
from thinkwise.strategies import greedy, voting, best_of_n, budget, deepconf, probe, first_pass  # noqa: F401, I001
from thinkwise.strategies.base import (
    Answer, Backend, LocalBackend, LocalSampleGroup, SampleGroup, SampleOutcome, StrategyCost,
)
from thinkwise.strategies.registry import (
    REGISTRY, Param, StrategyDef, StrategyRun, StrategySpec, model_prefix_strategy, option_params, parse_strategy,
    register, run_registered, split_strategies, strategy_help,
)
from thinkwise.tasks.extraction import extract_answer

__all__ = [
    "Answer", "Backend", "SampleGroup", "LocalSampleGroup", "SampleOutcome", "StrategyCost", "StrategySpec",
    "StrategyDef", "StrategyRun", "Param", "REGISTRY", "register", "parse_strategy", "run_strategy",
    "model_prefix_strategy", "option_params", "split_strategies", "strategy_help", "LocalBackend", "STRATEGY_HELP",
]

STRATEGY_HELP = strategy_help()


async def run_strategy(
    backend: Backend,
    spec: StrategySpec,
    prompt_ids,
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
    extractor = extract if callable(extract) else partial(extract_answer, method=extract)
    answer = await run_registered(StrategyRun(backend, spec, prompt_ids, params, prompt_text, extractor, verifier))
    answer.cost_basis = getattr(backend, "cost_basis", "engine")
    return answer
