"""DeepConf (Fu et al., 2025, "Deep Think with Confidence"): filter and weight traces by the model's confidence.

Token confidence is -mean of the top-k log-probabilities at each sampled position (paper
k = 20); the engine computes it on the device with the draw and it arrives with the
token (`SamplingParams.confidence_top_k`, `SampleGroup.token_confidences`), so no step
waits for it. Group confidence is its mean over a sliding window of the last W tokens
(paper W = 2048); a trace shorter than W has one group, all its tokens. A trace's score
is its lowest group confidence (the paper's choice for both modes), or, offline, the mean
of its bottom 10% of groups, its tail (the last W tokens) or its mean.

- `deepconf@k` (offline): k traces to the end; keep the top eta% by score (eta = 10,
  "DeepConf-low", or 90, "DeepConf-high"), vote weighted by score.
- `deepconf-online@k`: a warm-up of N traces runs to the end; the stopping threshold is
  the (100 - eta)th percentile of their scores. The other k - N traces run together, and
  any whose group confidence (over a full window) falls below the threshold is aborted
  at once (its KV blocks freed); after every finished trace the confidence-weighted vote
  is checked, and once the leader holds a share >= tau (paper 0.95) the rest are
  aborted. Votes: warm-up traces scoring at least the threshold, then every later trace
  that finished without being stopped (as in the paper, a trace shorter than W is never
  checked), each weighted by its score.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

from thinkwise.errors import InvalidParameterError
from thinkwise.strategies.base import Answer, SampleOutcome, StrategyCost, Stopwatch, outcomes
from thinkwise.strategies.registry import Param, StrategyDef, StrategyRun, register, samples_param
from thinkwise.tasks.extraction import answer_key

SCORES = ("lowest", "bottom10", "tail", "mean")


def group_confidences(token_confidences: list[float], window: int) -> list[float]:
    """Mean confidence of every window of `window` consecutive tokens (one group when shorter)."""
    values = [c for c in token_confidences if c == c]  # nan: a token that carried none (forced)
    if not values:
        return []
    if len(values) <= window:
        return [sum(values) / len(values)]
    groups, total = [], sum(values[:window])
    groups.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        groups.append(total / window)
    return groups


def trace_score(token_confidences: list[float], window: int, method: str = "lowest") -> float | None:
    """A trace's confidence by `method` (see module docstring); None for a trace without tokens."""
    values = [c for c in token_confidences if c == c]
    if not values:
        return None
    if method == "mean":
        return sum(values) / len(values)
    if method == "tail":
        tail = values[-window:]
        return sum(tail) / len(tail)
    groups = group_confidences(values, window)
    if method == "bottom10":
        lowest = sorted(groups)[: max(1, math.ceil(len(groups) * 0.10))]
        return sum(lowest) / len(lowest)
    return min(groups)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def weighted_vote(samples: list[SampleOutcome]) -> tuple[SampleOutcome | None, dict[str, float]]:
    """Sum of scores per answer; the winner's representative is its most confident sample."""
    totals: dict[str, float] = {}
    labels: dict[str, str] = {}
    members: dict[str, list[SampleOutcome]] = {}
    for s in samples:
        if s.answer is None or s.score is None:
            continue
        key = answer_key(s.answer)
        totals[key] = totals.get(key, 0.0) + s.score
        labels.setdefault(key, s.answer)
        members.setdefault(key, []).append(s)
    if not totals:
        return None, {}
    winner = max(totals, key=lambda key: (totals[key], len(members[key])))
    chosen = max(members[winner], key=lambda s: (s.score, -s.num_tokens))
    return chosen, {labels[key]: value for key, value in totals.items()}


def keep_top(samples: list[SampleOutcome], eta: float) -> list[SampleOutcome]:
    """The top eta% of scored samples by score (at least one)."""
    scored = sorted((s for s in samples if s.score is not None), key=lambda s: -s.score)
    return scored[: max(1, math.ceil(len(scored) * eta / 100.0))] if scored else []


class WindowTracker:
    """A trace's sliding-window group confidence, updated per token on the host."""

    def __init__(self, window: int):
        self.window = window
        self.values: deque[float] = deque()
        self.total = 0.0
        self.lowest: float | None = None  # lowest group confidence over full windows

    def add(self, confidence: float) -> float | None:
        """Add one token's confidence; returns the group confidence once a window is full."""
        if confidence != confidence:
            return None
        self.values.append(confidence)
        self.total += confidence
        if len(self.values) > self.window:
            self.total -= self.values.popleft()
        if len(self.values) < self.window:
            return None
        group = self.total / self.window
        self.lowest = group if self.lowest is None else min(self.lowest, group)
        return group


def _score_all(samples: list[SampleOutcome], confidences: list[list[float]], window: int, method: str) -> None:
    for sample in samples:
        sample.score = trace_score(confidences[sample.index], window, method)


async def deepconf_offline(run: StrategyRun) -> Answer:
    spec = run.spec
    clock = Stopwatch()
    group = await run.backend.start(run.prompt, replace(run.params, n=spec.k, confidence_top_k=spec.confidence_k))
    final = await group.wait()
    cost = StrategyCost(samples=spec.k)
    cost.add(final.counts, run.backend.intensity)
    samples = outcomes(group, run.extract)
    _score_all(samples, group.token_confidences, spec.window, spec.score)
    voters = keep_top([s for s in samples if s.finished and s.answer is not None], spec.eta)
    chosen, votes = weighted_vote(voters)
    cost.wall_time_s = clock.seconds()
    return Answer(strategy=f"deepconf@{spec.k}", answer=chosen.answer if chosen else None,
                  text=chosen.text if chosen else "", votes=votes, samples=samples, cost=cost)


def consensus(voters: list[SampleOutcome]) -> float:
    """The weighted vote share of the leading answer (0 with no votes)."""
    _, votes = weighted_vote(voters)
    total = sum(votes.values())
    return max(votes.values()) / total if votes and total > 0 else 0.0


async def deepconf_online(run: StrategyRun) -> Answer:
    spec = run.spec
    clock = Stopwatch()
    params = replace(run.params, confidence_top_k=spec.confidence_k)
    # Warm-up: N traces to the end set the threshold.
    warm = await run.backend.start(run.prompt, replace(params, n=spec.warmup))
    cost = StrategyCost()
    cost.add((await warm.wait()).counts, run.backend.intensity)
    samples = outcomes(warm, run.extract)
    _score_all(samples, warm.token_confidences, spec.window, "lowest")
    threshold = None
    scored = [s for s in samples if s.score is not None]
    if scored:
        threshold = percentile([s.score for s in scored], 100.0 - spec.eta)
    voters = [s for s in samples if s.finished and s.answer is not None and s.score is not None
              and threshold is not None and s.score >= threshold]
    remaining = spec.k - spec.warmup
    stopped: set[int] = set()
    if remaining > 0 and consensus(voters) < spec.tau:
        seed = None if params.seed is None else params.seed + 1_000_003
        group = await run.backend.start(run.prompt, replace(params, n=remaining, seed=seed))
        trackers = [WindowTracker(spec.window) for _ in range(remaining)]
        seen = [0] * remaining
        decided = False
        try:
            while not group.done:
                events = await group.next_events()
                for index in sorted({i for i, _ in events}):
                    confidences = group.token_confidences[index]
                    too_low = False
                    for value in confidences[seen[index]:]:
                        level = trackers[index].add(value)
                        if threshold is not None and level is not None and level < threshold:
                            too_low = True
                    seen[index] = len(confidences)
                    if too_low and group.finish_reasons[index] is None and not decided and index not in stopped:
                        stopped.add(index)
                        await group.abort_sample(index, f"deepconf: group confidence fell below the warm-up "
                                                        f"threshold {threshold:.4g}")
                for index, reason in events:
                    if reason != "stop" or decided:
                        continue
                    outcome = _late_outcome(group, index, run.extract, spec, len(samples))
                    if outcome.answer is not None and outcome.score is not None:
                        voters.append(outcome)  # it passed every check it met (none, if shorter than W)
                    if consensus(voters) >= spec.tau:
                        decided = True
                if decided and not group.done:
                    await group.abort_rest(f"deepconf: the weighted vote passed tau={spec.tau:g}")
        except BaseException:
            if not group.done:
                await group.abort_rest("the strategy failed")
            raise
        cost.add(group.final.counts, run.backend.intensity)
        later = outcomes(group, run.extract)
        for sample in later:
            sample.score = trace_score(group.token_confidences[sample.index], spec.window, "lowest")
            sample.index += len(samples)
        samples = samples + later
    cost.samples = len(samples)
    cost.aborted_samples = sum(1 for s in samples if s.finish_reason == "abort")
    chosen, votes = weighted_vote(voters)
    cost.wall_time_s = clock.seconds()
    return Answer(strategy=f"deepconf-online@{spec.k}", answer=chosen.answer if chosen else None,
                  text=chosen.text if chosen else "", votes=votes, samples=samples, cost=cost)


def _late_outcome(group, index: int, extract, spec, offset: int) -> SampleOutcome:
    text = group.texts[index]
    return SampleOutcome(index=offset + index, text=text, answer=extract(text), num_tokens=group.num_tokens[index],
                         finish_reason="stop",
                         score=trace_score(group.token_confidences[index], spec.window, "lowest"))


def _check_online(values: dict) -> None:
    if values["k"] < 2:
        raise InvalidParameterError(f"deepconf-online@k needs k >= 2 (a warm-up and later traces), got k={values['k']}",
                                    param="k")
    if not 1 <= values["warmup"] < values["k"]:
        raise InvalidParameterError(f"warmup (of deepconf-online@{values['k']}) must be in [1, k - 1] = "
                                    f"[1, {values['k'] - 1}], got {values['warmup']}", param="warmup")


def _params(online: bool) -> tuple[Param, ...]:
    common = (
        samples_param(help="traces (k); online: the most traces"),
        Param("eta", float, 90.0, "keep the top eta% of traces by confidence (paper: 10 or 90)", low=0.0, high=100.0,
              open_low=True),
        Param("window", int, 2048, "tokens per sliding-window group", low=1, high=1_000_000),
        Param("confidence_k", int, 20, "top-k logprobs per token confidence", low=1, high=1024),
    )
    if online:
        return common + (
            Param("tau", float, 0.95, "stop once the weighted vote's leader holds this share", low=0.0, high=1.0,
                  open_low=True),
            Param("warmup", int, lambda values: min(16, max(1, values.get("k", 2) // 4)),
                  "warm-up traces that set the threshold (default min(16, k/4))", low=1, high=4096),
        )
    return common + (Param("score", str, "lowest", "trace score", choices=SCORES),)


register(StrategyDef(
    kind="deepconf", pattern=r"deepconf@(?P<k>\w*)", usage="deepconf@K",
    help="k traces, the top eta% by confidence vote weighted by confidence (DeepConf offline)",
    params=_params(online=False), runner=deepconf_offline, suggestions=("deepconf@{last}", "deepconf@k"),
))
register(StrategyDef(
    kind="deepconf_online", pattern=r"deepconf-online@(?P<k>\w*)", usage="deepconf-online@K",
    help="warm-up traces set a confidence threshold; later traces stop below it, all stop at consensus tau",
    params=_params(online=True), check=_check_online, runner=deepconf_online,
    suggestions=("deepconf-online@{last}", "deepconf-online@k"),
))
