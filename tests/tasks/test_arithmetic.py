"""Arithmetic and statistics families: the reference is the true value (recomputed here
independently), the knob sets digits or list length, answers are read the way small
models write them, and StreetMath's tolerance is exactly 5%."""

from __future__ import annotations

import statistics
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.tasks import get_family

seeds = st.integers(0, 10**6)


def longest_increasing(values: list[int]) -> int:
    """Quadratic dynamic programme, independent of the family's patience sort."""
    best = [1] * len(values)
    for i in range(len(values)):
        for j in range(i):
            if values[j] < values[i]:
                best[i] = max(best[i], best[j] + 1)
    return max(best, default=0)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, level=st.integers(3, 20))
def test_statistics_references_are_the_true_values(seed, level):
    values = get_family("mean").generate(level, seed).data["values"]
    assert len(values) == level and statistics.mean(values) == int(get_family("mean").generate(level, seed).reference)
    median = get_family("median").generate(level, seed)
    assert len(median.data["values"]) == 2 * level + 1
    assert statistics.median(median.data["values"]) == int(median.reference)
    mode = get_family("mode").generate(level, seed)
    counts = Counter(mode.data["values"]).most_common()
    assert len(mode.data["values"]) == level
    assert counts[0][0] == int(mode.reference) and (len(counts) == 1 or counts[0][1] > counts[1][1])  # unique
    count = get_family("count").generate(level, seed)
    assert sum(v > count.data["threshold"] for v in count.data["values"]) == int(count.reference)
    lis = get_family("lis").generate(level, seed)
    assert len(lis.data["values"]) == level and longest_increasing(lis.data["values"]) == int(lis.reference)
    sort = get_family("sort").generate(level, seed)
    assert sort.reference == ", ".join(map(str, sorted(sort.data["values"])))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, digits=st.integers(1, 10))
def test_sum_and_product_scale_with_digits(seed, digits):
    total = get_family("sum").generate(digits, seed)
    assert all(len(str(t)) == digits for t in total.data["terms"]) and int(total.reference) == sum(total.data["terms"])
    product = get_family("product").generate(digits, seed)
    a, b = product.data["factors"]
    assert len(str(a)) == len(str(b)) == digits and int(product.reference) == a * b
    assert len(product.reference) >= 2 * digits - 1


def test_answers_are_read_as_small_models_write_them():
    product = get_family("product").generate(4, 3)
    value = int(product.reference)
    for response in (f"Answer: {value}", f"Answer: {value:,}", f"\\boxed{{{value}}}", f"The product is {value}.",
                     f"**Answer:** {product.data['factors'][0]} * {product.data['factors'][1]} = {value}",
                     f"Answer:\n{value}.0"):
        assert get_family("product").check(product, response), response
    assert not get_family("product").check(product, f"Answer: {value} or {value + 1}")
    large = get_family("product").generate(10, 3)  # a 19- or 20-digit product: exact, no tolerance
    assert not get_family("product").check(large, f"Answer: {int(large.reference) + 1}")
    assert get_family("product").extract(large, f"Answer: {int(large.reference):,}") == large.reference


def test_sort_reads_lists_and_rejects_a_wrong_order_or_a_missing_item():
    family = get_family("sort")
    problem = family.generate(8, 4)
    values = sorted(problem.data["values"])
    assert family.check(problem, f"Answer: [{', '.join(map(str, values))}]")
    assert family.check(problem, "Answer: " + " < ".join(map(str, values)).replace("-", "\u2212"))
    assert family.check(problem, "\\boxed{" + ",".join(map(str, values)) + "}")
    assert not family.check(problem, "Answer: " + ", ".join(map(str, values[:-1])))
    assert not family.check(problem, "Answer: " + ", ".join(map(str, values[::-1])))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, level=st.integers(1, 6))
def test_approx_accepts_exactly_within_five_percent(seed, level):
    family = get_family("approx")
    problem = family.generate(level, seed)
    a, b = problem.data["factors"]
    exact = Fraction(str(a)) * Fraction(str(b))
    assert Fraction(problem.reference) == exact
    assert 10 ** (level - 1) <= a <= 10**level
    for factor, accepted in ((Fraction(104, 100), True), (Fraction(96, 100), True), (Fraction(106, 100), False),
                             (Fraction(94, 100), False)):
        guess = float(exact * factor)
        assert family.check(problem, f"Roughly {guess:.6f}.\nAnswer: {guess:.6f}") is accepted
    assert family.check(problem, family.reference_response(problem))  # a rounded estimate


def test_lists_and_numbers_grow_with_the_level():
    for name in ("mean", "mode", "count", "lis", "sort"):
        family = get_family(name)
        low, high = family.min_level, family.max_level
        assert len(family.generate(high, 0).data["values"]) > len(family.generate(low, 0).data["values"]) * 4
    assert len(get_family("sum").generate(12, 0).reference) > len(get_family("sum").generate(2, 0).reference) + 8


@pytest.mark.parametrize("name", ["sum", "product", "mean", "median", "mode", "count", "lis", "approx"])
def test_a_wrong_number_is_rejected(name):
    family = get_family(name)
    for seed in range(20):
        problem = family.generate(family.default_levels[1], seed)
        wrong = Fraction(problem.reference) * 2 + 1
        assert not family.check(problem, f"Answer: {float(wrong)}")
