"""Best-of-N with a verifier, plain or weighted.

All n samples run to completion (sharing the prompt's KV blocks); a verifier scores
each — an exact checker, the sandboxed code-test runner, or a reward model. Plain
best-of-n returns the highest-scoring sample (ties to the shorter chain); weighted
best-of-n sums the scores of samples that give the same answer and returns the answer
with the largest total. Scoring runs in a worker thread so a slow verifier never
blocks the event loop that other requests stream through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.strategies.base import Answer, Backend, Stopwatch, sample_to_completion
from thinkwise.strategies.registry import StrategyDef, register, samples_param
from thinkwise.tasks.extraction import answer_key


class Verifier(Protocol):
    def score(self, prompt: str, completion: str, answer: str | None) -> float: ...


async def best_of_n(backend: Backend, prompt_ids: list[int], prompt_text: str, params: SamplingParams, n: int,
                    verifier: Verifier, extract: Callable[[str], str | None], weighted: bool = False) -> Answer:
    clock = Stopwatch()
    samples, cost = await sample_to_completion(backend, prompt_ids, replace(params, n=n), extract)

    def score_all() -> list[float]:
        if hasattr(verifier, "score_many"):  # sandboxes run in parallel, reward models batch
            scores = verifier.score_many(prompt_text, [s.text for s in samples], [s.answer for s in samples])
            return [float(x) for x in scores]
        return [float(verifier.score(prompt_text, s.text, s.answer)) for s in samples]

    for sample, score in zip(samples, await asyncio.to_thread(score_all)):
        sample.score = score
    votes: dict[str, float] = {}
    chosen = None
    if weighted:
        totals: dict[str, float] = {}
        labels: dict[str, str] = {}
        for s in samples:
            if s.answer is not None:
                key = answer_key(s.answer)
                totals[key] = totals.get(key, 0.0) + s.score
                labels.setdefault(key, s.answer)
        if totals:
            best_key = max(totals, key=lambda k: totals[k])
            chosen = max((s for s in samples if s.answer is not None and answer_key(s.answer) == best_key),
                         key=lambda s: (s.score, -s.num_tokens))
            votes = {labels[k]: v for k, v in totals.items()}
    else:
        chosen = max(samples, key=lambda s: (s.score, -s.num_tokens)) if samples else None
        votes = {s.answer: max(votes.get(s.answer, float("-inf")), s.score) for s in samples if s.answer is not None}
    cost.wall_time_s = clock.seconds()
    name = f"{'weighted-' if weighted else ''}best-of-{n}"
    return Answer(strategy=name, answer=chosen.answer if chosen else None, text=chosen.text if chosen else "",
                  votes=votes, samples=samples, cost=cost)


for _weighted in (False, True):
    register(StrategyDef(
        kind="weighted_best_of_n" if _weighted else "best_of_n",
        pattern=r"weighted-best-of-(?P<k>\w+)" if _weighted else r"best-of-(?P<k>\w+)",
        usage="weighted-best-of-K" if _weighted else "best-of-K",
        help=("k samples, the answer whose samples' verifier scores sum highest" if _weighted
              else "k samples, the one a verifier scores highest"),
        params=(samples_param(),), needs_verifier=True,
        runner=(lambda run, w=_weighted: best_of_n(run.backend, run.prompt, run.prompt_text, run.params, run.spec.k,
                                                   run.verifier, run.extract, weighted=w)),
        suggestions=("weighted-best-of-{last}", "weighted-best-of-n") if _weighted else ("best-of-{last}", "best-of-n"),
    ))
