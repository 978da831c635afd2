"""Voting strategies: majority@k (self-consistency), short-m@k, and adaptive sampling.

All three vote over the extracted answers of samples that *finished* (stopped on their
own): a sample cut off by its token budget usually holds a truncated chain whose last
number is noise, and letting those vote was measured to erase self-consistency's gain
on the default model. majority@k waits for all k; short-m@k (Hassid et al.) aborts the
rest as soon as m have finished — their KV blocks are freed at once — and votes among
those m, ties going to the shortest chain; adaptive samples in rounds and stops as
soon as the vote is decided (Snell et al.'s compute-optimal allocation per prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from math import comb

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.strategies.base import (
    Answer, Backend, SampleOutcome, StrategyCost, Stopwatch, outcomes, sample_to_completion,
)
from thinkwise.strategies.registry import Param, StrategyDef, check_m_le_k, register, samples_param
from thinkwise.tasks.extraction import answer_key


def vote(samples: list[SampleOutcome], tie_break: str = "mean_length") -> tuple[SampleOutcome | None, dict[str, float]]:
    """Plurality over finished samples' answers. Ties go to the answer whose chains are
    shorter on average ("mean_length") or to the single shortest chain ("shortest").
    Returns the representative sample of the winning answer and the vote table."""
    groups: dict[str, list[SampleOutcome]] = {}
    labels: dict[str, str] = {}
    for sample in samples:
        if sample.finished and sample.answer is not None:
            key = answer_key(sample.answer)
            groups.setdefault(key, []).append(sample)
            labels.setdefault(key, sample.answer)
    if not groups:
        return None, {}

    def rank(key: str):
        members = groups[key]
        lengths = [m.num_tokens for m in members]
        tie = sum(lengths) / len(lengths) if tie_break == "mean_length" else min(lengths)
        return (-len(members), tie)

    winner = min(groups, key=rank)
    representative = min(groups[winner], key=lambda s: s.num_tokens)
    return representative, {labels[k]: float(len(v)) for k, v in groups.items()}


def _answer(strategy: str, samples, cost, chosen, votes) -> Answer:
    return Answer(
        strategy=strategy, answer=chosen.answer if chosen else None, text=chosen.text if chosen else "",
        votes=votes, samples=samples, cost=cost,
    )


async def majority(backend: Backend, prompt_ids: list[int], params: SamplingParams, k: int,
                   extract: Callable[[str], str | None]) -> Answer:
    clock = Stopwatch()
    samples, cost = await sample_to_completion(backend, prompt_ids, replace(params, n=k), extract)
    chosen, votes = vote(samples, "mean_length")
    cost.wall_time_s = clock.seconds()
    return _answer(f"majority@{k}", samples, cost, chosen, votes)


async def short_m_of_k(backend: Backend, prompt_ids: list[int], params: SamplingParams, k: int, m: int,
                       extract: Callable[[str], str | None]) -> Answer:
    if not 1 <= m <= k:
        from thinkwise.errors import InvalidParameterError

        raise InvalidParameterError(f"short-m@k needs 1 <= m <= k, got m={m}, k={k}", param="m")
    clock = Stopwatch()
    group = await backend.start(prompt_ids, replace(params, n=k))
    finished_order: list[int] = []
    while not group.done:
        for index, reason in await group.next_events():
            if reason == "stop" and index not in finished_order:
                finished_order.append(index)
        if len(finished_order) >= m and not group.done:
            await group.abort_rest(f"short-{m}@{k}: {m} samples had already finished")
    cost = StrategyCost(samples=k)
    cost.add(group.final.counts, backend.intensity)
    samples = outcomes(group, extract)
    cost.aborted_samples = sum(1 for s in samples if s.finish_reason == "abort")
    first_m = {i for i in finished_order[:m]}
    chosen, votes = vote([s for s in samples if s.index in first_m], "shortest")
    cost.wall_time_s = clock.seconds()
    return _answer(f"short-{m}@{k}", samples, cost, chosen, votes)


def leader_is_decided(counts: list[int], remaining: int, threshold: float) -> bool:
    """True when more samples cannot change the winner, or when the posterior probability
    that the leader holds a majority share (Beta(1 + c, 1 + n - c) > 1/2) passes
    `threshold`. For integers, P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a), so
    the tail is an exact binomial sum: P(share > 1/2) = P(Binomial(n, 1/2) < a)."""
    if not counts:
        return False
    ordered = sorted(counts, reverse=True)
    leader, runner_up = ordered[0], (ordered[1] if len(ordered) > 1 else 0)
    if leader > runner_up + remaining:
        return True
    total = sum(counts)
    a, b = 1 + leader, 1 + total - leader
    n = a + b - 1
    p_majority = sum(comb(n, j) for j in range(a)) / 2**n
    return p_majority >= threshold


async def adaptive(backend: Backend, prompt_ids: list[int], params: SamplingParams, max_samples: int,
                   extract: Callable[[str], str | None], round_size: int = 4, threshold: float = 0.95) -> Answer:
    clock = Stopwatch()
    cost = StrategyCost()
    samples: list[SampleOutcome] = []
    base_seed = params.seed
    round_index = 0
    while len(samples) < max_samples:
        size = min(round_size, max_samples - len(samples))
        seed = None if base_seed is None else base_seed + 1_000_003 * round_index
        group = await backend.start(prompt_ids, replace(params, n=size, seed=seed))
        cost.add((await group.wait()).counts, backend.intensity)
        for sample in outcomes(group, extract):
            sample.index = len(samples)
            samples.append(sample)
        cost.samples = len(samples)
        round_index += 1
        _, votes = vote(samples)
        if leader_is_decided([int(v) for v in votes.values()], max_samples - len(samples), threshold):
            break
    chosen, votes = vote(samples)
    cost.wall_time_s = clock.seconds()
    return _answer(f"adaptive:{max_samples}", samples, cost, chosen, votes)


register(StrategyDef(
    kind="majority", pattern=r"(?:majority|maj|self-consistency)@(?P<k>\w*)", usage="majority@K",
    help="k samples, plurality vote over the finished ones (self-consistency)",
    params=(samples_param(),),
    runner=lambda run: majority(run.backend, run.prompt, run.params, run.spec.k, run.extract),
    suggestions=("majority@{last}", "self-consistency@{last}", "majority@k"),
))
register(StrategyDef(
    kind="short", pattern=r"short-(?P<m>\w+)@(?P<k>\w+)", usage="short-M@K",
    help="k samples, stop all once m finished, vote among those m (short-m@k with --k/--m)",
    params=(samples_param(), Param("m", int, None, "vote among the first m to finish", low=1, high=4096)),
    check=check_m_le_k,
    runner=lambda run: short_m_of_k(run.backend, run.prompt, run.params, run.spec.k, run.spec.m, run.extract),
    suggestions=("short-{m}@{last}", "short-m@k"),
))
register(StrategyDef(
    kind="adaptive", pattern=r"adaptive(?::(?P<k>\w+))?", usage="adaptive:MAX",
    help="rounds of samples until the vote is decided (at most MAX samples)",
    params=(samples_param(help="most samples (MAX)"),
            Param("round_size", int, 4, "samples per round", low=1, high=4096),
            Param("threshold", float, 0.95, "stop once P(leader holds the majority) reaches this", low=0.5,
                  high=1.0)),
    runner=lambda run: adaptive(run.backend, run.prompt, run.params, run.spec.k, run.extract, run.spec.round_size,
                                run.spec.threshold),
    suggestions=("adaptive:{first}",),
))
