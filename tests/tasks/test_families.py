"""Properties every registered task family must have, over many seeds and several levels:
the checker accepts the family's own reference response and rejects a corrupted one,
generation is deterministic in (level, seed) and JSON-serializable, the prompt states an
answer format and does not contain the answer (where that means something), and the
levels the family declares all generate."""

from __future__ import annotations

import dataclasses
import json
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks import FAMILIES, check, extract, get_family

# code runs the sandbox per check; its few sandbox-backed tests are in test_code.py.
NAMES = sorted(n for n in FAMILIES if n not in ("jsonl", "code"))
NUMERIC = ("sum", "product", "mean", "median", "mode", "count", "lis", "sequence")
# Families whose answer is necessarily or often a number shown in the prompt itself
# (the median and mode are list items; small counts and lengths appear as list items).
ANSWER_MAY_APPEAR = ("median", "mode", "count", "lis", "mean")


def corrupt(name: str, problem) -> str:
    """A response that must be rejected: the reference, broken the way a wrong answer is."""
    ref = problem.reference
    if name in NUMERIC:
        return f"Answer: {Fraction(ref) + 1}"  # exact: a float would round a 20-digit product
    if name == "approx":
        return f"Answer: {float(ref) * 1.2}"
    if name == "sort":
        values = ref.split(", ")
        i = next((i for i in range(len(values) - 1) if values[i] != values[i + 1]), None)
        if i is None:
            return "Answer: " + ", ".join(values[1:])  # all equal: one item missing
        values[i], values[i + 1] = values[i + 1], values[i]
        return "Answer: " + ", ".join(values)
    if name in ("hanoi", "checkers", "river", "blocks"):
        moves = re.split(r",\s*(?![^()]*\))", ref)
        return "Answer: " + ", ".join(moves[:-1])  # one move short: never solved
    if name == "queens":
        columns = ref.split(", ")
        moved = 0 if problem.data["fixed_row"] != 1 else 1
        columns[moved] = columns[moved + 1]  # two queens share a column
        return "Answer: " + ", ".join(columns)
    if name == "coloring":
        colors = ref.split(", ")
        a, b = problem.data["edges"][0]
        colors[a] = colors[b]
        return "Answer: " + ", ".join(colors)
    if name == "sat":
        values = dict(item.split("=") for item in ref.split(", "))
        for variable, negated in problem.data["clauses"][0]:
            values[f"x{variable + 1}"] = "T" if negated else "F"  # every literal of clause 1 false
        return "Answer: " + ", ".join(f"{k}={v}" for k, v in values.items())
    if name == "output":
        return "Answer: " + re.sub(r"-?\d+", lambda m: str(int(m[0]) + 1), ref, count=1)
    raise AssertionError(f"no corruption for {name}")


def test_there_are_at_least_twelve_families_and_each_describes_itself():
    assert len(FAMILIES) - 1 >= 12  # jsonl is a loader, not a generated family
    for name, family in FAMILIES.items():
        assert family.name == name and family.description
        assert family.min_level <= min(family.default_levels) <= max(family.default_levels) <= family.max_level


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), pick=st.integers(0, 2))
def test_reference_accepted_and_corruption_rejected(name, seed, pick):
    family = get_family(name)
    level = family.default_levels[pick % len(family.default_levels)]
    problem = family.generate(level, seed)
    response = family.reference_response(problem)
    assert family.check(problem, response) and check(problem, response)
    assert extract(problem, response) == family.extract(problem, response) is not None
    assert not family.check(problem, corrupt(name, problem))
    assert not family.check(problem, "I am not sure.")
    assert not family.check(problem, "")
    again = family.generate(level, seed)
    assert again == problem and again.data == problem.data  # deterministic in (level, seed), data included
    assert problem.id == f"{name}:{level}:{seed}"


@pytest.mark.parametrize("name", NAMES)
def test_every_declared_level_generates_and_data_survives_json(name):
    family = get_family(name)
    for level in sorted({family.min_level, family.max_level, *family.default_levels}):
        problem = family.generate(level, 5)
        restored = dataclasses.replace(problem, data=json.loads(json.dumps(problem.data)))
        assert family.check(restored, family.reference_response(problem))  # what a JSONL round trip keeps
        assert "Answer" in problem.prompt or "```python" in problem.prompt  # the prompt says how to answer
    for level in (family.min_level - 1, family.max_level + 1):
        with pytest.raises(InvalidParameterError, match="levels"):
            family.generate(level, 0)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ANSWER_MAY_APPEAR])
def test_prompt_does_not_contain_the_answer(name):
    family = get_family(name)
    for level in family.default_levels:
        for seed in range(30):
            problem = family.generate(level, seed)
            assert problem.reference not in problem.prompt


def test_different_seeds_give_different_problems():
    for name in NAMES:
        family = get_family(name)
        level = family.default_levels[-1]
        prompts = {family.generate(level, seed).prompt for seed in range(20)}
        # Checker jumping and river crossing have one instance per size (as in "The Illusion
        # of Thinking"); Hanoi varies its start and goal pegs (six problems per size);
        # everything else varies freely with the seed.
        expected = {"checkers": 1, "river": 1, "hanoi": 6}
        assert len(prompts) == expected[name] if name in expected else len(prompts) >= 10, name
