"""Arithmetic and statistics families (after BeyondBench's easy suite) and StreetMath.

The level is the number of digits (sum, product) or the list length (statistics,
sorting, counting, longest increasing subsequence); answers are numbers compared
numerically, except `sort`, whose answer is a list compared element by element. Lists are
drawn so the answer is unique (e.g. `mode` plants one most frequent value). `approx`
asks for a product of decimals "roughly", and accepts any answer within 5% (StreetMath).
"""

from __future__ import annotations

import bisect
import math
import random
import re
import statistics
from collections import Counter
from fractions import Fraction

from thinkwise.tasks.base import ANSWER_FORMAT, NumericFamily, Problem, TaskFamily, answer_line, register
from thinkwise.tasks.extraction import parse_number


def _numbers(rng: random.Random, count: int, low: int = 1, high: int = 99) -> list[int]:
    return [rng.randint(low, high) for _ in range(count)]


def _list_text(values) -> str:
    return ", ".join(str(v) for v in values)


@register
class SumFamily(NumericFamily):
    name, description = "sum", "add three multi-digit numbers (level = digits)"
    min_level, max_level, default_levels = 1, 12, (2, 4, 6)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 96 + 48 * level

    def make(self, level, rng):
        terms = [rng.randint(10 ** (level - 1), 10**level - 1) for _ in range(3)]
        return f"Compute {' + '.join(map(str, terms))}. {ANSWER_FORMAT}", str(sum(terms)), {"terms": terms}


@register
class ProductFamily(NumericFamily):
    name, description = "product", "multiply two multi-digit numbers (level = digits)"
    min_level, max_level, default_levels = 1, 10, (2, 3, 4)

    def answer_tokens(self, level):
        return 48

    def reasoning_tokens(self, level):
        return 128 + 96 * level

    def make(self, level, rng):
        a, b = (rng.randint(10 ** (level - 1), 10**level - 1) for _ in range(2))
        return f"Compute {a} * {b}. {ANSWER_FORMAT}", str(a * b), {"factors": [a, b]}


@register
class MeanFamily(NumericFamily):
    name, description = "mean", "mean of a list (level = length); integer mean by construction"
    min_level, max_level, default_levels = 2, 40, (4, 8, 16)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 96 + 16 * level

    def make(self, level, rng):
        values = _numbers(rng, level)
        values[-1] += (-sum(values)) % level  # make the mean an integer
        return (f"What is the mean (average) of these numbers: {_list_text(values)}? {ANSWER_FORMAT}",
                str(sum(values) // level), {"values": values})


@register
class MedianFamily(NumericFamily):
    name, description = "median", "median of an odd-length list (level = length 2*level+1)"
    min_level, max_level, default_levels = 1, 20, (2, 4, 8)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 96 + 16 * (2 * level + 1)

    def make(self, level, rng):
        values = _numbers(rng, 2 * level + 1)
        return (f"What is the median of these numbers: {_list_text(values)}? {ANSWER_FORMAT}",
                str(statistics.median(values)), {"values": values})


@register
class ModeFamily(NumericFamily):
    name, description = "mode", "the most frequent value (unique by construction; level = list length)"
    min_level, max_level, default_levels = 3, 40, (6, 12, 24)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 96 + 12 * level

    def make(self, level, rng):
        pool = rng.sample(range(1, 60), max(2, level // 2))
        values = [rng.choice(pool) for _ in range(level)]
        mode = rng.choice(values)
        while True:  # turn other items into `mode` until it is the unique most frequent value
            counts = Counter(values)
            if all(counts[mode] > count for value, count in counts.items() if value != mode):
                break
            values[rng.choice([i for i, v in enumerate(values) if v != mode])] = mode
        return (f"Which number appears most often in this list: {_list_text(values)}? {ANSWER_FORMAT}",
                str(mode), {"values": values})


@register
class CountFamily(NumericFamily):
    name, description = "count", "how many list items exceed a threshold (level = length)"
    min_level, max_level, default_levels = 3, 60, (8, 16, 32)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 96 + 10 * level

    def make(self, level, rng):
        values = _numbers(rng, level)
        threshold = rng.randint(20, 80)
        answer = sum(v > threshold for v in values)
        return (f"How many numbers in this list are greater than {threshold}: {_list_text(values)}? {ANSWER_FORMAT}",
                str(answer), {"values": values, "threshold": threshold})


@register
class LongestIncreasingFamily(NumericFamily):
    name, description = "lis", "length of the longest strictly increasing subsequence (level = length)"
    min_level, max_level, default_levels = 3, 40, (6, 10, 16)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 128 + 24 * level

    def make(self, level, rng):
        values = _numbers(rng, level)
        tails: list[int] = []
        for v in values:
            index = bisect.bisect_left(tails, v)
            tails[index:index + 1] = [v]
        return (f"What is the length of the longest strictly increasing subsequence of: {_list_text(values)}? "
                f"{ANSWER_FORMAT}", str(len(tails)), {"values": values})


@register
class SortFamily(TaskFamily):
    name, description = "sort", "sort a list ascending (level = length); answer compared element by element"
    min_level, max_level, default_levels = 2, 40, (5, 10, 20)

    def answer_tokens(self, level):
        return 16 + 4 * level

    def reasoning_tokens(self, level):
        return 96 + 12 * level

    def make(self, level, rng):
        values = _numbers(rng, level, -50, 99)
        return (f"Sort these numbers in ascending order: {_list_text(values)}. "
                "End your reply with a final line `Answer: <the sorted numbers, comma-separated>`.",
                _list_text(sorted(values)), {"values": values})

    def extract(self, problem, text):
        line = answer_line(text)
        if line is None:
            return None
        numbers = [parse_number(n) for n in re.findall(r"[-+\u2212]?\d+(?:\.\d+)?", line)]
        if not numbers or any(n is None for n in numbers):
            return None
        return _list_text(int(n) if n.denominator == 1 else float(n) for n in numbers)

    def check(self, problem, text):
        return self.extract(problem, text) == problem.reference


@register
class ApproximateFamily(NumericFamily):
    name, description = "approx", "StreetMath: estimate a product of decimals; within 5% counts (level = digits)"
    min_level, max_level, default_levels = 1, 6, (2, 3, 4)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 192
    tolerance = Fraction(5, 100)

    def make(self, level, rng):
        a = round(rng.uniform(10 ** (level - 1), 10**level), 2)
        b = round(rng.uniform(1, 100), 2)
        exact = Fraction(str(a)) * Fraction(str(b))
        return (f"Roughly how much is {a} times {b}? A quick estimate within 5% is enough. {ANSWER_FORMAT}",
                str(float(exact)), {"factors": [a, b], "tolerance": float(self.tolerance)})

    def check(self, problem, text):
        got = parse_number(self.extract(problem, text))
        exact = parse_number(problem.reference)
        return got is not None and abs(got - exact) <= self.tolerance * abs(exact)

    def reference_response(self, problem: Problem) -> str:
        exact = float(problem.reference)
        decimals = 2 - math.floor(math.log10(abs(exact)))  # three significant digits: within 0.5%
        estimate = f"{round(exact, decimals):.{max(decimals, 0)}f}"
        return f"About {estimate}.\nAnswer: {estimate}"
