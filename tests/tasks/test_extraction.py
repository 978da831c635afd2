"""Answer extraction per method, numeric comparison, and the keys votes are grouped by."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks.extraction import (
    METHODS, answer_key, answers_equal, extract_answer, fenced_code_blocks, normalize_answer, parse_number,
)


@pytest.mark.parametrize("text, expected", [
    ("So x = -3.", "-3"),
    ("Total: 1,234 apples", "1234"),
    ("It costs $3.50.", "3.50"),
    ("Half of it is 1/2", "1/2"),
    ("about 6.02e23 atoms.", "6.02e23"),
    ("first 7, then 12.", "12"),
    ("\u22125 degrees", "-5"),
    ("so the value is -\\frac{3}{4}", "-3/4"),
    ("a .5 chance", ".5"),
    ("5 - 3", "3"),  # a binary minus is not a sign
    ("H2O, the 5th, x2 and 2x", None),  # digits glued to words are not numbers
    ("no numbers here", None),
])
def test_last_number(text, expected):
    assert extract_answer(text, "last_number") == expected


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} or rather \\boxed{x^{2}+1}", "x^{2}+1"),
    ("first \\boxed{5}, then \\boxed{6", "5"),  # a cut-off last box falls back to the complete one
    ("\\boxed {7}", "7"),
    ("nothing boxed", None),
])
def test_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected


@pytest.mark.parametrize("text, expected", [
    ("work...\nAnswer: 42.", "42"),
    ("**Answer:** Paris.", "Paris"),
    ("The final answer is: **7**.\nThanks!", "7"),
    ("Final answer: x = 5", "x = 5"),
    ("Answer: 3\nLater: the answer is 4", "4"),  # the last marker wins
    ("Answer:\n\n  12 \n", "12"),  # answer on the next line
    ("I have no marker", None),
])
def test_answer_line(text, expected):
    assert extract_answer(text, "answer_line") == expected


@pytest.mark.parametrize("text, expected", [
    ("(A) 3 (B) 4 (C) 5. The answer is C.", "C"),
    ("Answer: D", "D"),
    ("I first thought (B).\nActually the answer is A", "A"),
    ("The correct option is **E**", "E"),
    ("\\boxed{B}", "B"),
    ("B", "B"),
    ("The answer is Apple", None),  # a word starting with a capital is not a choice
    ("answer is a", None),
])
def test_choice(text, expected):
    assert extract_answer(text, "choice") == expected


def test_code_takes_the_last_block_without_its_language_tag():
    text = "Here:\n```python\nprint(1)\n```\nand output\n```text\n1\n```\nfinal:\n```py\ndef f():\n    return 2\n```\n"
    assert extract_answer(text, "code") == "def f():\n    return 2"
    assert [lang for lang, _ in fenced_code_blocks(text)] == ["python", "text", "py"]


def test_code_block_cut_off_by_the_closing_fence_stop_string_still_counts():
    assert extract_answer("```python\ndef f():\n    return 1\n", "code") == "def f():\n    return 1\n"
    assert extract_answer("~~~\nx = 1\n~~~", "code") == "x = 1"
    assert extract_answer("no code", "code") is None


@pytest.mark.parametrize("text, expected", [
    ("we get \\boxed{17}. Answer: 18", "17"),  # boxed first
    ("The answer is 18 dollars.", "18"),  # one number on the answer line answers with it
    ("Answer: (2, 3)", "(2, 3)"),  # several numbers: the line stays whole
    ("Answer: B", "B"),
    ("so 5, then 7", "7"),  # last number when nothing else is there
    ("", None),
])
def test_auto(text, expected):
    assert extract_answer(text) == expected


def test_unknown_method_is_a_user_error():
    with pytest.raises(InvalidParameterError, match="last_number"):
        extract_answer("1", "lastnumber")
    assert set(METHODS) == {"auto", "boxed", "answer_line", "last_number", "choice", "code"}


@pytest.mark.parametrize("a, b", [
    ("1,000", "1000.0"), ("1e3", "1000"), ("0.5", "1/2"), ("\\frac{1}{2}", ".5"), ("$5", "5"), ("-3", "\u22123"),
    ("50%", "50"), ("x = 5", "5"), ("3.50", "3.5"), ("1/3", "0.333333333333"), (" Paris. ", "paris"),
    ("$\\text{Paris}$", "PARIS"), ("New  York", "new york"), ("1e400", "1E400"),
])
def test_equal_answers_share_a_key(a, b):
    assert answers_equal(a, b) and answers_equal(b, a)
    assert answer_key(a) == answer_key(b)


@pytest.mark.parametrize("a, b", [
    ("1,2", "12"),  # not a thousands separator: a pair, not a number
    ("1000", "1001"), ("0.5", "0.51"), ("5", "five"), ("Paris", "London"), ("1/0", "1"),
])
def test_different_answers(a, b):
    assert not answers_equal(a, b)
    assert answer_key(a) != answer_key(b)


def test_none_never_equals():
    assert not answers_equal(None, None) and not answers_equal("1", None)


def test_tolerance_is_relative():
    assert answers_equal("1000000000", "1000000000.5")
    assert not answers_equal("1", "1.00001")
    assert answer_key("1,000,000") == "1000000" and answer_key("2.50") == "2.5"


def test_normalize_answer():
    assert normalize_answer("  $The  Answer$. ") == "the answer"
    assert parse_number("not a number") is None and parse_number("-1/4") == Fraction(-1, 4)


# Property tests: formatting never splits a vote.

integers = st.integers(min_value=-10**12, max_value=10**12)


def with_commas(n: int) -> str:
    return f"{n:,}"


@settings(deadline=None)
@given(integers)
def test_any_integer_spelling_is_one_answer(n):
    spellings = [str(n), with_commas(n), f"{n}.0", f"{n}.000", f"${n}", f"{n}.", f"{n}e0", f"{n * 10}e-1"]
    if n % 1000 == 0:
        spellings.append(f"{n // 1000}e3")
    keys = {answer_key(s) for s in spellings}
    assert keys == {str(n)}
    assert all(answers_equal(spellings[0], s) for s in spellings)


@settings(deadline=None)
@given(integers)
def test_last_number_reads_back_what_was_written(n):
    text = f"After some work we find the total is {with_commas(n)}."
    assert answers_equal(extract_answer(text, "last_number"), str(n))
    assert answers_equal(extract_answer(f"Answer: {n}", "auto"), str(n))


@settings(deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 10**6))
def test_fractions_equal_their_decimal(p, q):
    assert answers_equal(f"{p}/{q}", repr(p / q))
    assert answer_key(f"{p}/{q}") == answer_key(f"{2 * p}/{2 * q}")


answer_text = st.text(alphabet="0123456789.,-/$ eEaxB=%", max_size=12)


@settings(max_examples=300, deadline=None)
@given(answer_text)
def test_normalization_is_idempotent(s):
    assert normalize_answer(normalize_answer(s)) == normalize_answer(s)


@settings(max_examples=300, deadline=None)
@given(answer_text, answer_text)
def test_equal_keys_mean_equal_answers(a, b):
    assert answers_equal(a, a)
    assert answers_equal(a, b) == answers_equal(b, a)
    if answer_key(a) == answer_key(b):
        assert answers_equal(a, b)
