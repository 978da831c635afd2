"""Greedy decoding as a strategy: one sample at temperature 0, the baseline every other is compared to."""

from __future__ import annotations

from dataclasses import replace

from thinkwise.strategies.base import Answer, Stopwatch, sample_to_completion
from thinkwise.strategies.registry import StrategyDef, StrategyRun, register


async def greedy(run: StrategyRun) -> Answer:
    clock = Stopwatch()
    samples, cost = await sample_to_completion(run.backend, run.prompt, replace(run.params, n=1, temperature=0.0),
                                               run.extract)
    cost.wall_time_s = clock.seconds()
    sample = samples[0]
    return Answer("greedy", sample.answer, sample.text, {sample.answer: 1.0} if sample.answer else {}, samples, cost)


register(StrategyDef(kind="greedy", pattern=r"greedy", usage="greedy", help="one sample at temperature 0",
                     runner=greedy, deterministic=True, suggestions=("greedy",)))
