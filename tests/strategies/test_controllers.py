"""Strategy controllers driven by a scripted backend: exact abort points, stopping rules, seeds.

The controllers in `voting` only see a backend's `SampleGroup`: per-step events (sample
index, finish reason), `abort_rest`, `wait`, and the final counts. `ScriptedGroup` plays
a fixed script of events, so the step at which a controller acts is known exactly and
checked exactly; a real engine's finish order is not scripted, so the tests on the tiny
model (test_strategies.py) cannot say "on exactly the m-th finish". The adaptive
stopping rule is checked against an independent computation of the Beta posterior's
tail, integrated exactly with fractions rather than through the binomial identity the
code uses.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from fractions import Fraction
from math import comb
from types import SimpleNamespace

import pytest

from thinkwise.engine.sampler import mix_seed
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import TokenCounts
from thinkwise.strategies import voting


class ScriptedGroup:
    """k samples whose events come from `script`: one list of (index, reason, text) per step."""

    def __init__(self, k: int, script: list[list[tuple[int, str | None, str]]]):
        self.k = k
        self.script = list(script)
        self.texts = [""] * k
        self.num_tokens = [0] * k
        self.finish_reasons: list[str | None] = [None] * k
        self.abort_reasons: list[str | None] = [None] * k
        self.final = None
        self.steps_played = 0
        self.aborted_after_step: int | None = None
        self.abort_calls = 0

    @property
    def done(self) -> bool:
        return self.final is not None

    def _finish(self) -> None:
        counts = TokenCounts(prompt_tokens=3, prompt_tokens_computed=3, generated_tokens=sum(self.num_tokens),
                             flops=1000.0, bytes_weights=40.0, bytes_kv=10.0)
        self.final = SimpleNamespace(counts=counts)

    async def next_events(self):
        if self.final is not None:
            return []
        step = self.script.pop(0)
        self.steps_played += 1
        changes = []
        for index, reason, text in step:
            assert self.finish_reasons[index] is None, "script error: event after a finish"
            self.texts[index] += text
            self.num_tokens[index] += 1
            self.finish_reasons[index] = reason
            changes.append((index, reason))
        if not self.script or all(r is not None for r in self.finish_reasons):
            self._finish()
        return changes

    async def wait(self):
        while self.final is None:
            await self.next_events()
        return self.final

    async def abort_rest(self, reason: str):
        self.abort_calls += 1
        self.aborted_after_step = self.steps_played
        for i in range(self.k):
            if self.finish_reasons[i] is None:
                self.finish_reasons[i] = "abort"
                self.abort_reasons[i] = reason
        self._finish()
        return self.final


class ScriptedBackend:
    intensity = 2.0  # FLOP per byte, to check the controllers pass it on
    cost_basis = "engine"

    def __init__(self, groups):
        self.groups = list(groups)
        self.started: list[SamplingParams] = []
        self.prompts: list = []

    async def start(self, prompt_ids, params: SamplingParams):
        self.started.append(params)
        self.prompts.append(prompt_ids)
        group = self.groups.pop(0)
        assert group.k == params.n, f"the controller asked for {params.n} samples, the script has {group.k}"
        return group


def first_char(text: str) -> str | None:
    return text[:1] or None


# ----------------------------------------------------------------------------- short-m@k
SHORT_SCRIPT = [
    [(i, None, "") for i in range(6)],  # step 1: everyone starts
    [(4, "stop", "A")],  # finish 1
    [(1, "length", "Z")],  # ran out of budget: not a finish that counts
    [(2, "stop", "B")],  # finish 2
    [(0, None, "x"), (3, None, "y")],
    [(5, "stop", "B")],  # finish 3
    [(0, "stop", "C"), (3, "stop", "C")],  # finishes 4 and 5, after the third
]


@pytest.mark.parametrize("m, abort_step", [(1, 2), (2, 4), (3, 6)])
def test_short_m_of_k_aborts_on_exactly_the_mth_finish(m, abort_step):
    group = ScriptedGroup(6, SHORT_SCRIPT)
    backend = ScriptedBackend([group])
    answer = asyncio.run(voting.short_m_of_k(backend, [1, 2, 3], SamplingParams(seed=1), 6, m, first_char))
    assert group.abort_calls == 1 and group.aborted_after_step == abort_step
    assert backend.started[0].n == 6
    voters = [4, 2, 5][:m]
    assert sum(answer.votes.values()) == m
    assert sorted(s.index for s in answer.samples if s.finish_reason == "stop") == sorted(voters)
    assert answer.cost.aborted_samples == 6 - m - (1 if abort_step >= 3 else 0)  # sample 1 ended on 'length'


def test_short_m_of_k_votes_only_among_the_first_m_finishes():
    # The 2nd and 3rd finishes arrive in one step: only the first m=2 in event order vote.
    script = [[(0, "stop", "A")], [(1, "stop", "B"), (2, "stop", "C")], [(3, "stop", "C")]]
    group = ScriptedGroup(4, script)
    answer = asyncio.run(voting.short_m_of_k(ScriptedBackend([group]), [1], SamplingParams(), 4, 2, first_char))
    assert group.aborted_after_step == 2
    assert answer.votes == {"A": 1.0, "B": 1.0}


def test_short_m_of_k_never_aborts_when_fewer_than_m_finish():
    script = [[(0, "stop", "A")], [(1, "length", "B")], [(2, "length", "C")]]
    group = ScriptedGroup(3, script)
    answer = asyncio.run(voting.short_m_of_k(ScriptedBackend([group]), [1], SamplingParams(), 3, 2, first_char))
    assert group.abort_calls == 0 and answer.votes == {"A": 1.0}


def test_short_m_of_k_reports_who_was_aborted_why_and_what_it_cost():
    group = ScriptedGroup(6, SHORT_SCRIPT)
    backend = ScriptedBackend([group])
    answer = asyncio.run(voting.short_m_of_k(backend, [1, 2, 3], SamplingParams(seed=1), 6, 2, first_char))
    assert backend.prompts == [[1, 2, 3]] and answer.strategy == "short-2@6"
    aborted = [s for s in answer.samples if s.finish_reason == "abort"]
    assert sorted(s.index for s in aborted) == [0, 3, 5]
    assert all(s.abort_reason == "short-2@6: 2 samples had already finished" for s in aborted)
    assert answer.cost.samples == 6 and answer.cost.requests == 1 and answer.cost.aborted_samples == 3
    assert answer.cost.effective_flops == 1000.0 + 2.0 * (40.0 + 10.0)  # the backend's intensity prices bytes
    assert answer.votes == {"A": 1.0, "B": 1.0} and answer.answer in ("A", "B")


def test_short_m_of_k_with_m_equal_to_k_waits_for_everyone():
    script = [[(0, "stop", "A")], [(1, "stop", "B")], [(2, "stop", "B")]]
    group = ScriptedGroup(3, script)
    answer = asyncio.run(voting.short_m_of_k(ScriptedBackend([group]), [1], SamplingParams(), 3, 3, first_char))
    assert group.steps_played == 3 and answer.votes == {"A": 1.0, "B": 2.0} and answer.answer == "B"


@pytest.mark.parametrize("m, k", [(0, 4), (5, 4), (-1, 2)])
def test_short_m_of_k_refuses_m_outside_1_to_k(m, k):
    from thinkwise.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=f"1 <= m <= k, got m={m}, k={k}") as caught:
        asyncio.run(voting.short_m_of_k(ScriptedBackend([]), [1], SamplingParams(), k, m, first_char))
    assert caught.value.param == "m"


# ----------------------------------------------------------------------------- majority
def test_majority_votes_over_finished_samples_only_and_breaks_ties_by_mean_length():
    # Answers: B twice (chains of 2 and 2 tokens), A twice (1 and 6), C once but cut off by
    # the budget (it does not vote). A and B tie at two votes; B's chains are shorter on
    # average (2 against 3.5), though A holds the single shortest chain.
    script = [
        [(0, "stop", "A")] + [(i, None, "") for i in range(1, 5)],
        [(1, "stop", "B"), (3, "stop", "B")],
        [(2, None, "x")],
        [(2, None, "y")],
        [(2, None, "z")],
        [(2, "stop", "A"), (4, "length", "C")],
    ]
    group = ScriptedGroup(5, script)
    backend = ScriptedBackend([group])
    answer = asyncio.run(voting.majority(backend, [7, 8], SamplingParams(seed=3), 5, lambda t: t[-1:] or None))
    assert backend.started[0].n == 5 and backend.prompts == [[7, 8]]
    assert answer.strategy == "majority@5" and group.abort_calls == 0
    assert answer.votes == {"B": 2.0, "A": 2.0}
    assert answer.answer == "B" and answer.text == "B"
    assert answer.cost.samples == 5 and answer.cost.decode_tokens == sum(group.num_tokens)
    assert [s.index for s in answer.samples] == [0, 1, 2, 3, 4]
    assert [s.finish_reason for s in answer.samples] == ["stop", "stop", "stop", "stop", "length"]
    assert isinstance(answer.cost.wall_time_s, float) and answer.cost.wall_time_s >= 0


def test_majority_with_no_finished_sample_has_no_answer():
    group = ScriptedGroup(2, [[(0, "length", "A"), (1, "length", "B")]])
    answer = asyncio.run(voting.majority(ScriptedBackend([group]), [1], SamplingParams(), 2, first_char))
    assert answer.answer is None and answer.votes == {} and answer.text == ""


# ----------------------------------------------------------------------------- adaptive
def beta_tail_above_half(a: int, b: int) -> Fraction:
    """P(X > 1/2) for X ~ Beta(a, b), integers a, b >= 1, integrated exactly: expand
    (1 - x)^(b-1) and integrate each power of x over [1/2, 1] and [0, 1]."""
    def integral(lo: Fraction) -> Fraction:
        return sum((Fraction(comb(b - 1, j) * (-1) ** j, a + j) * (1 - lo ** (a + j)) for j in range(b)), Fraction(0))
    return integral(Fraction(1, 2)) / integral(Fraction(0))


def oracle_decided(counts: list[int], remaining: int, threshold: float) -> bool:
    if not counts:
        return False
    ordered = sorted(counts, reverse=True) + [0]
    leader, runner_up = ordered[0], ordered[1]
    if leader > runner_up + remaining:
        return True
    return beta_tail_above_half(1 + leader, 1 + sum(counts) - leader) >= Fraction(threshold)


def test_the_oracle_itself_on_known_values():
    assert beta_tail_above_half(1, 1) == Fraction(1, 2)
    assert beta_tail_above_half(4, 2) == Fraction(13, 16)  # a 3-1 split: 1 - P(Bin(5, 1/2) >= 4)
    assert beta_tail_above_half(2, 4) == Fraction(3, 16)


@pytest.mark.parametrize("counts, remaining, threshold", [
    ([3, 1], 12, 0.95),  # 3-1: posterior 0.8125, not decided
    ([5, 2], 9, 0.95),  # 5-2: posterior 0.855, not decided
    ([5, 2], 9, 0.85),  # ... but decided at a lower threshold
    ([3, 1], 12, 0.8),
    ([4], 12, 0.95),  # 4-0: 31/32
    ([7, 1], 8, 0.95),
    ([6, 1], 8, 0.95),
    ([2, 2], 12, 0.95),
    ([5, 0], 4, 0.999),  # cannot be overtaken any more
    ([5, 1], 3, 0.999),  # 5 > 1 + 3
    ([5, 2], 3, 0.999),  # 5 == 2 + 3: could still be tied
])
def test_leader_is_decided_matches_the_exact_beta_tail(counts, remaining, threshold):
    assert voting.leader_is_decided(counts, remaining, threshold) == oracle_decided(counts, remaining, threshold)


def test_leader_is_decided_matches_the_exact_beta_tail_on_a_grid():
    for leader, runner_up, third, remaining in itertools.product(range(9), range(6), range(3), range(0, 9, 2)):
        counts = [c for c in (leader, runner_up, third) if c]
        for threshold in (0.8, 0.9, 0.95, 0.99):
            expected = oracle_decided(counts, remaining, threshold)
            assert voting.leader_is_decided(counts, remaining, threshold) == expected, (counts, remaining, threshold)


def round_group(answers: str) -> ScriptedGroup:
    """One round whose samples finish with these one-letter answers ('-' ran out of budget)."""
    step = [(i, "length" if a == "-" else "stop", a) for i, a in enumerate(answers)]
    return ScriptedGroup(len(answers), [step])


def expected_rounds(rounds: list[str], max_samples: int, threshold: float) -> int:
    tally: dict[str, int] = {}
    seen = 0
    for number, answers in enumerate(rounds, 1):
        for a in answers:
            if a != "-":
                tally[a] = tally.get(a, 0) + 1
        seen += len(answers)
        if seen >= max_samples or oracle_decided(list(tally.values()), max_samples - seen, threshold):
            return number
    raise AssertionError("script too short")


@pytest.mark.parametrize("rounds, max_samples, n_rounds", [
    (["AAAB", "AAAA", "AAAA", "AAAA"], 16, 2),  # 3-1 does not stop; 7-1 does
    (["AAAAABB", "AAAAAAA", "AAAAAAA"], 21, 2),  # 5-2 does not stop; 12-2 does
    (["AAAA", "BBBB"], 16, 1),  # unanimous 4-0 stops at once
    (["AB--", "ABAB", "AAAA", "AAAA"], 16, 4),  # unfinished samples do not vote
    (["AAAB", "BBBA", "ABAB"], 12, 3),  # max_samples reached
])
def test_adaptive_runs_exactly_the_rounds_the_beta_rule_asks_for(rounds, max_samples, n_rounds):
    size = len(rounds[0])
    backend = ScriptedBackend([round_group(r) for r in rounds])
    answer = asyncio.run(voting.adaptive(backend, [1, 2], SamplingParams(seed=9), max_samples, first_char,
                                         round_size=size, threshold=0.95))
    assert expected_rounds(rounds, max_samples, 0.95) == n_rounds
    assert len(backend.started) == n_rounds and answer.cost.requests == n_rounds
    assert answer.cost.samples == len(answer.samples) == size * n_rounds
    assert answer.answer == "A"


def test_adaptive_matches_the_rule_on_random_scripts():
    rng = random.Random(0)
    for _ in range(60):
        size = rng.choice([2, 3, 4, 5])
        max_samples = size * rng.randint(1, 5)
        rounds = ["".join(rng.choice("AAAB-C") for _ in range(size)) for _ in range(max_samples // size)]
        threshold = rng.choice([0.8, 0.9, 0.95])
        backend = ScriptedBackend([round_group(r) for r in rounds])
        asyncio.run(voting.adaptive(backend, [1], SamplingParams(seed=1), max_samples, first_char,
                                    round_size=size, threshold=threshold))
        assert len(backend.started) == expected_rounds(rounds, max_samples, threshold), (rounds, threshold)


def test_adaptive_gives_every_round_and_every_sample_its_own_seed():
    rounds = ["AB", "BA", "AB", "BA", "AB"]
    backend = ScriptedBackend([round_group(r) for r in rounds])
    asyncio.run(voting.adaptive(backend, [1], SamplingParams(seed=42, temperature=1.0), 10, first_char,
                                round_size=2, threshold=0.99))
    assert len(backend.started) == 5
    round_seeds = [p.seed for p in backend.started]
    assert all(s is not None for s in round_seeds) and len(set(round_seeds)) == 5
    # The engine derives sample i's seed from (request seed, i): no sample repeats another's draws.
    sample_seeds = [mix_seed(p.seed, i) for p in backend.started for i in range(p.n)]
    assert len(set(sample_seeds)) == len(sample_seeds)
    # The same request seed gives the same rounds again (reproducible), another seed other rounds.
    again = ScriptedBackend([round_group(r) for r in rounds])
    asyncio.run(voting.adaptive(again, [1], SamplingParams(seed=42, temperature=1.0), 10, first_char,
                                round_size=2, threshold=0.99))
    assert [p.seed for p in again.started] == round_seeds
    other = ScriptedBackend([round_group(r) for r in rounds])
    asyncio.run(voting.adaptive(other, [1], SamplingParams(seed=43, temperature=1.0), 10, first_char,
                                round_size=2, threshold=0.99))
    assert not set(p.seed for p in other.started) & set(round_seeds)
