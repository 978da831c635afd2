"""Code families. `code`: the hidden tests stay out of the prompt, the reference passes them
and a one-constant mutant fails them (checked in-process, cheaply, over many seeds), and
the sandbox judges replies (a few runs only). `output`: the reference is what the program
prints, recomputed here, and replies are read in the forms models give them."""

from __future__ import annotations

import contextlib
import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.tasks import get_family
from thinkwise.tasks.code import SPECS


def passes(source: str, tests: list[str]) -> bool:
    namespace: dict = {}
    exec(source, namespace)
    for test in tests:
        try:
            exec(test, dict(namespace))
        except Exception:  # a failed assert or a crash: either way the test fails
            return False
    return True


def mutant(source: str) -> str:
    """The reference with its first integer literal after the signature increased by one."""
    signature, _, body = source.partition("\n")
    m = re.search(r"(?<![\w.])(\d+)(?![\w.])", body)
    return f"{signature}\n{body[:m.start()]}{int(m[1]) + 1}{body[m.end():]}"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), level=st.integers(1, 4))
def test_hidden_tests_pass_the_reference_and_stay_out_of_the_prompt(seed, level):
    family = get_family("code")
    problem = family.generate(level, seed)
    tests = problem.data["tests"]
    assert len(tests) == family.tests_per_problem and passes(problem.reference, tests)
    assert "assert" not in problem.prompt and problem.reference.split("\n")[1].strip() not in problem.prompt
    assert f"`{problem.data['function']}(" in problem.prompt and "```python" in problem.prompt
    assert family.generate(level, seed).data == problem.data


def test_hidden_tests_catch_mutants_for_every_spec():
    family = get_family("code")
    caught = {spec.name: [0, 0] for spec in SPECS}
    for level in range(1, 5):
        for seed in range(120):
            problem = family.generate(level, seed)
            counts = caught[problem.data["function"]]
            counts[0] += not passes(mutant(problem.reference), problem.data["tests"])
            counts[1] += 1
    for name, (killed, total) in caught.items():
        assert total >= 10 and killed / total >= 0.8, (name, killed, total)


def test_levels_draw_from_their_own_tier_of_the_bank():
    family = get_family("code")
    for level in range(1, 5):
        names = {family.generate(level, seed).data["function"] for seed in range(40)}
        assert names == {spec.name for spec in SPECS if spec.level == level}
    assert len(SPECS) >= 16


def test_the_sandbox_judges_code_replies():
    family = get_family("code")
    for level in range(1, 5):
        problem = family.generate(level, level)
        assert family.check(problem, family.reference_response(problem))
    problem = family.generate(2, 11)
    name = problem.data["function"]
    assert family.check(problem, f"Here you go:\n```\n{problem.reference}```\nDone.")  # untagged fence
    assert not family.check(problem, f"```python\n{mutant(problem.reference)}```")
    # No sandbox run for these: no code at all, or not the function asked for.
    assert not family.check(problem, "I would loop over the list.")
    assert not family.check(problem, f"```python\n{problem.reference.replace(name, name + '_v2')}```")
    assert family.extract(problem, "no code") is None


def test_replies_that_fake_equality_or_read_the_tests_score_nothing():
    family = get_family("code")
    problem = family.generate(1, 5)
    name = problem.data["function"]
    always_equal = ("class Anything(int):\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = int.__hash__\n"
                    f"def {name}(*args):\n    return Anything(0)\n")
    assert not family.check(problem, f"```python\n{always_equal}```")
    # The expected values are not in the sandbox to be found: scanning every reachable
    # frame and the job for them finds nothing to return.
    snoop = ("import sys, re\n"
             "seen = repr([sys._getframe(i).f_locals for i in range(1, 3)])\n"
             "values = re.findall(r'== (.+?)[\\'\"]', seen)\n"
             f"def {name}(*args):\n    return eval(values.pop(0)) if values else None\n")
    from thinkwise.tasks.sandbox import CodeTestVerifier

    assert CodeTestVerifier(problem.data["tests"]).run(snoop).passed == 0


def printed(program: str) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(program, {})
    return buffer.getvalue().strip()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), level=st.integers(1, 12))
def test_output_reference_is_what_the_program_prints(seed, level):
    family = get_family("output")
    problem = family.generate(level, seed)
    assert printed(problem.data["program"]) == problem.reference
    assert problem.data["program"] in problem.prompt and "Answer:" in problem.prompt
    assert family.check(problem, family.reference_response(problem))


def test_output_reads_replies_and_grows_with_the_level():
    family = get_family("output")
    problem = family.generate(5, 9)
    line = problem.reference
    for response in (f"Answer: {line}", f"Answer: `{line}`", f"Answer:\n```\n{line}\n```", f"\\boxed{{{line}}}",
                     f"The program prints:\nAnswer:   {line.replace(' ', '  ')}  "):
        assert family.check(problem, response), response
    assert not family.check(problem, f"Answer: {line} 0")
    assert not family.check(problem, f"It prints {line}")  # no answer line: nothing to read

    def lines(level):
        return sum(len(family.generate(level, seed).data["program"].split("\n")) for seed in range(20))

    assert lines(1) < lines(4) < lines(12)
