"""first-pass@k: stop every sample the moment one passes the verifier.

k samples run together; each one that finishes is scored at once (in a worker thread,
so the sandbox or checker never blocks the event loop) and as soon as a score reaches
`pass_score` the remaining samples are aborted — their KV blocks freed before the next
step — and the passing sample is the answer. It is the verified counterpart of
short-1@k: with an exact checker or code tests the first correct sample ends the
search. Samples that finish while a score is being computed are scored in turn, in the
order they finished. When none passes, the highest-scoring sample is returned (ties to
the shorter chain), as best-of-k would. Needs a verifier; without one the registry
refuses the strategy with an error naming it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from thinkwise.strategies.base import Answer, StrategyCost, Stopwatch, outcomes
from thinkwise.strategies.registry import Param, StrategyDef, StrategyRun, register, samples_param


def _score(verifier, prompt: str, text: str, answer: str | None) -> float:
    return float(verifier.score(prompt, text, answer))


async def first_pass(run: StrategyRun) -> Answer:
    k, threshold = run.spec.k, run.spec.pass_score
    clock = Stopwatch()
    group = await run.backend.start(run.prompt, replace(run.params, n=k))
    scores: dict[int, float] = {}
    passed: int | None = None
    try:
        while not group.done and passed is None:
            for index, reason in await group.next_events():
                if reason == "stop" and index not in scores and passed is None:
                    text = group.texts[index]
                    scores[index] = await asyncio.to_thread(_score, run.verifier, run.prompt_text, text,
                                                            run.extract(text))
                    if scores[index] >= threshold:
                        passed = index
        if passed is not None and not group.done:
            await group.abort_rest(f"first-pass@{k}: sample {passed} passed the verifier")
        final = await group.wait()
    except BaseException:
        if not group.done:
            await group.abort_rest("the strategy failed")
        raise
    samples = outcomes(group, run.extract)
    for sample in samples:
        if sample.finished and sample.index not in scores and passed is None:
            scores[sample.index] = await asyncio.to_thread(_score, run.verifier, run.prompt_text, sample.text,
                                                           sample.answer)
        sample.score = scores.get(sample.index)
    cost = StrategyCost(samples=k)
    cost.add(final.counts, run.backend.intensity)
    cost.aborted_samples = sum(1 for s in samples if s.finish_reason == "abort")
    scored = [s for s in samples if s.score is not None]
    chosen = samples[passed] if passed is not None else (
        max(scored, key=lambda s: (s.score, -s.num_tokens)) if scored else None)
    votes: dict[str, float] = {}
    for s in scored:
        if s.answer is not None:
            votes[s.answer] = max(votes.get(s.answer, float("-inf")), s.score)
    cost.wall_time_s = clock.seconds()
    return Answer(strategy=f"first-pass@{k}", answer=chosen.answer if chosen else None,
                  text=chosen.text if chosen else "", votes=votes, samples=samples, cost=cost)


register(StrategyDef(
    kind="first_pass", pattern=r"first-pass@(?P<k>\w*)", usage="first-pass@K",
    help="k samples, the rest aborted as soon as one passes the verifier (exact checker or code tests)",
    params=(samples_param(),
            Param("pass_score", float, 1.0, "a verifier score at or above this passes", low=-1e9, high=1e9)),
    needs_verifier=True, runner=first_pass, suggestions=("first-pass@{last}", "first-pass@k"),
))
