"""Sequence continuation: every pattern kind occurs, the shown terms and the reference follow
the kind's rule, and the level makes the numbers larger and the shown prefix shorter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.tasks import get_family
from thinkwise.tasks.sequences import KINDS, _primes


def follows_rule(kind: str, terms: list[int]) -> bool:
    if kind == "arithmetic":
        return len({b - a for a, b in zip(terms, terms[1:])}) == 1
    if kind == "geometric":
        return terms[0] != 0 and len({b / a for a, b in zip(terms, terms[1:])}) == 1
    if kind == "fibonacci":
        return all(terms[i] == terms[i - 1] + terms[i - 2] for i in range(2, len(terms)))
    # a * p + b over consecutive primes: the gaps are a times the prime gaps.
    primes = _primes(200, 0)
    for start in range(len(primes) - len(terms)):
        window = primes[start:start + len(terms)]
        factor, rest = divmod(terms[1] - terms[0], window[1] - window[0])
        if not rest and factor > 0 and all(t - factor * p == terms[0] - factor * window[0] for t, p in zip(terms, window)):
            return True
    return False


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), level=st.integers(1, 8))
def test_terms_and_reference_follow_the_pattern(seed, level):
    problem = get_family("sequence").generate(level, seed)
    terms = problem.data["terms"] + [int(problem.reference)]
    assert follows_rule(problem.data["kind"], terms)
    assert len(problem.data["terms"]) == (6 if level <= 5 else 5)
    assert ", ".join(map(str, problem.data["terms"])) in problem.prompt


def test_every_kind_occurs_and_numbers_grow_with_the_level():
    family = get_family("sequence")
    assert {family.generate(3, seed).data["kind"] for seed in range(40)} == set(KINDS)

    def typical(level):
        return sorted(abs(int(family.generate(level, seed).reference)) for seed in range(60))[30]

    assert typical(1) < typical(4) < typical(8)
