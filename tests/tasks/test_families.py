"""Every task family: the checker accepts the generator's reference and rejects corruptions,
generation is deterministic, difficulty scales, and specs/JSONL load with clear errors."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks import FAMILIES, generate_problems, get_family, load_jsonl, parse_task_spec

NAMES = sorted(n for n in FAMILIES if n not in ("jsonl", "code"))
NUMERIC = ("sum", "product", "mean", "median", "mode", "count", "lis", "sequence")


def corrupt(name: str, problem) -> str:
    """A response that must be rejected: the reference, broken the way a wrong answer is."""
    ref = problem.reference
    if name in NUMERIC:
        return f"Answer: {int(float(ref)) + 1}"
    if name == "approx":
        return f"Answer: {float(ref) * 1.2}"
    if name == "sort":
        values = ref.split(", ")
        i = next(i for i in range(len(values) - 1) if values[i] != values[i + 1])
        values[i], values[i + 1] = values[i + 1], values[i]
        return "Answer: " + ", ".join(values)
    if name in ("hanoi", "checkers", "river", "blocks"):
        moves = re.split(r",\s*(?![^()]*\))", ref)
        return "Answer: " + ", ".join(moves[:-1])  # one move short: never solved
    if name == "queens":
        columns = ref.split(", ")
        columns[0], columns[1] = columns[1], columns[0]  # breaks the fixed first queen
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
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), pick=st.integers(0, 2))
def test_reference_accepted_and_corruption_rejected(name, seed, pick):
    family = get_family(name)
    level = family.default_levels[pick % len(family.default_levels)]
    problem = family.generate(level, seed)
    assert family.check(problem, family.reference_response(problem))
    assert not family.check(problem, corrupt(name, problem))
    assert not family.check(problem, "I am not sure.")
    assert family.generate(level, seed) == problem  # deterministic in (level, seed)


@pytest.mark.parametrize("name", ["sum", "product", "hanoi", "sort", "checkers", "river", "queens"])
def test_prompt_does_not_leak_the_answer(name):
    family = get_family(name)
    for seed in range(20):
        problem = family.generate(family.default_levels[-1], seed)
        assert problem.reference not in problem.prompt


def test_code_family_runs_hidden_tests_in_the_sandbox():
    family = get_family("code")
    problem = family.generate(2, 7)
    assert family.check(problem, family.reference_response(problem))
    assert "assert" not in problem.prompt  # tests stay hidden
    wrong = f"```python\ndef {problem.data['function']}(*args):\n    return None\n```"
    assert not family.check(problem, wrong)
    assert not family.check(problem, "no code here")


def test_difficulty_scales():
    hanoi = get_family("hanoi")
    assert [len(hanoi.generate(n, 0).reference.split(", ")) for n in (3, 4, 5, 6)] == [7, 15, 31, 63]
    assert len(get_family("sum").generate(6, 0).reference) > len(get_family("sum").generate(2, 0).reference)
    checkers = get_family("checkers")
    assert [len(checkers.generate(n, 0).reference.split(", ")) for n in (1, 2, 3)] == [3, 8, 15]  # n(n+2)
    river = get_family("river")
    assert len(river.generate(3, 0).reference.split("), (")) == 11  # the classic 11 crossings
    assert len(get_family("sat").generate(10, 0).data["clauses"]) > len(get_family("sat").generate(4, 0).data["clauses"])


def test_specs_and_errors(tmp_path):
    assert parse_task_spec("hanoi:3-5,sum:2,median") == [("hanoi", [3, 4, 5]), ("sum", [2]),
                                                         ("median", list(get_family("median").default_levels))]
    problems = generate_problems("hanoi:3-4,sum:2", n_per_level=2, seed=1)
    assert [p.id for p in problems] == [p.id for p in generate_problems("hanoi:3-4,sum:2", n_per_level=2, seed=1)]
    assert len(problems) == 6 and len({p.id for p in problems}) == 6
    with pytest.raises(InvalidParameterError, match="unknown task family"):
        parse_task_spec("nope:1")
    with pytest.raises(InvalidParameterError, match="levels"):
        parse_task_spec("hanoi:99")
    with pytest.raises(InvalidParameterError, match="bad levels"):
        parse_task_spec("hanoi:x")


def test_jsonl_loader(tmp_path):
    hanoi = get_family("hanoi").generate(3, 0)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "2+2?", "answer": "4"}),
        json.dumps({"prompt": "capital of France?", "answer": "Paris"}),
        json.dumps({"prompt": hanoi.prompt, "answer": hanoi.reference, "checker": "hanoi", "data": hanoi.data}),
    ]) + "\n")
    problems = load_jsonl(str(path))
    family = get_family("jsonl")
    assert family.check(problems[0], "it is 4.0\nAnswer: 4.0") and not family.check(problems[0], "Answer: 5")
    assert family.check(problems[1], "Answer: paris")
    assert family.check(problems[2], get_family("hanoi").reference_response(hanoi))
    assert not family.check(problems[2], "Answer: A->C")
    assert len(generate_problems(f"jsonl:{path}", n_per_level=0)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(InvalidParameterError, match="needs"):
        load_jsonl(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(InvalidParameterError, match="not valid JSON"):
        load_jsonl(str(bad))
