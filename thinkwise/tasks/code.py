"""Code families: write a function that passes hidden unit tests, and predict a program's output.

`code` (MBPP-style): a bank of small function specs in four tiers, each instantiated
with seed-dependent constants; the prompt gives the name, signature and behaviour, and
the unit tests (eight seeded inputs, expected values computed from our reference
implementation) stay hidden and run in the sandboxed runner (`sandbox.CodeTestVerifier`:
kernel isolation by bubblewrap, seccomp and rlimits; each `assert f(x) == y` is judged
outside the sandbox on plain data, and the expected value never enters it). The level is the
tier. `output` (SURGE-style): a generated program of `level` blocks (loops, branches,
while loops, helper calls, list and string updates) whose printed line the model must
predict; the reference is what the program printed when run at generation time in a
namespace with a few builtins and no imports, so it is exact and deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import re
from dataclasses import dataclass
from typing import Callable

from thinkwise.tasks.base import ANSWER_FORMAT, Problem, TaskFamily, register
from thinkwise.tasks.extraction import ANSWER_MARKER, answer_key, extract_answer, fenced_code_blocks


@dataclass(frozen=True)
class FunctionSpec:
    level: int
    name: str
    parameters: str
    description: str  # with {a} and {b}: seed-dependent constants (2 <= a <= 5 < b)
    body: str  # the reference implementation's body, also formatted with {a} and {b}
    arguments: Callable[[random.Random], list]  # one test's arguments


def _ints(r: random.Random, low: int, high: int, longest: int) -> list[int]:
    return [r.randint(low, high) for _ in range(r.randint(0, longest))]


SPECS = [
    FunctionSpec(1, "scale_sum", "xs", "return the sum of the list xs multiplied by {a}",
                 "return sum(xs) * {a}", lambda r: [_ints(r, -9, 9, 6)]),
    FunctionSpec(1, "count_multiples", "xs", "return how many items of xs are divisible by {a}",
                 "return sum(1 for x in xs if x % {a} == 0)", lambda r: [_ints(r, -30, 30, 8)]),
    FunctionSpec(1, "add_to_each", "xs", "return a new list with {b} added to every item of xs",
                 "return [x + {b} for x in xs]", lambda r: [_ints(r, -20, 20, 6)]),
    FunctionSpec(1, "last_digits", "n", "return the number formed by the last {a} decimal digits of the "
                 "non-negative integer n (leading zeros dropped, so 1005 with 3 digits gives 5)",
                 "return n % 10 ** {a}", lambda r: [r.choice([r.randint(0, 99), r.randint(0, 10**9)])]),
    FunctionSpec(2, "shift_word", "s", "return s with every lowercase letter shifted {a} places forward in the "
                 "alphabet, wrapping from z to a; other characters unchanged",
                 "return ''.join(chr((ord(c) - 97 + {a}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
                 lambda r: ["".join(r.choice("abcxyz -!Q") for _ in range(r.randint(0, 10)))]),
    FunctionSpec(2, "clip_list", "xs", "return a new list where items below {a} become {a} and items above {b} "
                 "become {b}", "return [min(max(x, {a}), {b}) for x in xs]", lambda r: [_ints(r, -20, 40, 8)]),
    FunctionSpec(2, "every_kth", "xs", "return the list of every {a}-th item of xs, starting with the first item "
                 "(positions 0, {a}, 2*{a}, ...)", "return xs[::{a}]", lambda r: [_ints(r, 0, 50, 12)]),
    FunctionSpec(2, "digit_sum_base", "n", "return the sum of the digits of the non-negative integer n written in "
                 "base {a}", "total = 0\n    while n:\n        total += n % {a}\n        n //= {a}\n    return total",
                 lambda r: [r.choice([0, r.randint(1, 30), r.randint(100, 10**6)])]),
    FunctionSpec(3, "run_lengths", "s", "return a list of [character, run length] pairs for the maximal runs of "
                 "equal characters in s, in order; only runs of length at least {a}",
                 "out = []\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
                 "            j += 1\n        if j - i >= {a}:\n            out.append([s[i], j - i])\n        i = j\n"
                 "    return out", lambda r: ["".join(r.choice("abc") * r.randint(1, 5) for _ in range(r.randint(0, 5)))]),
    FunctionSpec(3, "kth_distinct", "xs", "return the {a}-th smallest distinct value of xs (1-based), or None if "
                 "there are fewer than {a} distinct values",
                 "d = sorted(set(xs))\n    return d[{a} - 1] if len(d) >= {a} else None",
                 lambda r: [_ints(r, 0, 9, 9)]),
    FunctionSpec(3, "rotate_left", "xs", "return a new list: xs rotated left by {a} positions (the first item moves "
                 "to the end, {a} times); an empty list stays empty",
                 "if not xs:\n        return []\n    k = {a} % len(xs)\n    return xs[k:] + xs[:k]",
                 lambda r: [_ints(r, 0, 9, 7)]),
    FunctionSpec(3, "pairs_summing", "xs", "return how many pairs of positions i < j have xs[i] + xs[j] == {b}",
                 "return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] + xs[j] == {b})",
                 lambda r: [_ints(r, 0, 20, 9)]),
    FunctionSpec(4, "longest_run_above", "xs", "return the length of the longest stretch of consecutive items of xs "
                 "that are all greater than {a} (0 if there is none)",
                 "best = current = 0\n    for x in xs:\n        current = current + 1 if x > {a} else 0\n"
                 "        best = max(best, current)\n    return best", lambda r: [_ints(r, 0, 9, 12)]),
    FunctionSpec(4, "stair_ways", "n", "return the number of ways to climb n stairs taking 1 to {a} steps at a time "
                 "(order matters; 1 way for n = 0)",
                 "ways = [1] + [0] * n\n    for i in range(1, n + 1):\n"
                 "        ways[i] = sum(ways[i - s] for s in range(1, {a} + 1) if s <= i)\n    return ways[n]",
                 lambda r: [r.randint(0, 25)]),
    FunctionSpec(4, "merge_intervals", "intervals", "return the union of the closed intervals [start, end] in the "
                 "list intervals as a list of [start, end] lists sorted by start, where, going through the "
                 "intervals by start, one merges into the previous merged interval when its start is at most {a} "
                 "greater than that interval's end (so overlapping intervals merge too)",
                 "out = []\n    for start, end in sorted(intervals):\n        if out and start - out[-1][1] <= {a}:\n"
                 "            out[-1][1] = max(out[-1][1], end)\n        else:\n            out.append([start, end])\n"
                 "    return out",
                 lambda r: [[sorted([r.randint(0, 40), r.randint(0, 40)]) for _ in range(r.randint(0, 6))]]),
    FunctionSpec(4, "balanced_prefix", "s", "return the length of the longest prefix of s (a string of '(' and ')') "
                 "that is a balanced bracket string, nested at most {a} deep (the empty prefix counts, length 0)",
                 "depth = best = 0\n    for i, c in enumerate(s):\n        depth += 1 if c == '(' else -1\n"
                 "        if depth < 0 or depth > {a}:\n            break\n        if depth == 0:\n"
                 "            best = i + 1\n    return best",
                 lambda r: ["".join(r.choice("(()") for _ in range(r.randint(0, 14)))]),
]


@register
class CodeFamily(TaskFamily):
    name, description = "code", "write a Python function that passes hidden unit tests (level = spec tier)"
    min_level, max_level, default_levels = 1, 4, (1, 2, 3, 4)

    def answer_tokens(self, level):
        return 256  # the function itself
    cheap_check = False  # every check starts a sandboxed interpreter
    tests_per_problem = 8

    def make(self, level, rng):
        specs = [s for s in SPECS if s.level == level]
        spec = specs[rng.randrange(len(specs))]
        a = rng.randint(2, 5)
        constants = {"a": a, "b": a + rng.randint(5, 20)}
        source = f"def {spec.name}({spec.parameters}):\n    {spec.body.format(**constants)}\n"
        namespace: dict = {}
        exec(source, namespace)  # our own reference code, to compute the expected values
        tests = []
        for _ in range(self.tests_per_problem):
            args = spec.arguments(rng)
            # On a copy: the test must show the input as it was, whatever the call does to it.
            expected = namespace[spec.name](*copy.deepcopy(args))
            tests.append(f"assert {spec.name}(*{args!r}) == {expected!r}")
        prompt = (f"Write a Python function `{spec.name}({spec.parameters})` that: "
                  f"{spec.description.format(**constants)}. Reply with the complete function in one ```python "
                  "code block.")
        return prompt, source, {"tests": tests, "function": spec.name}

    def code(self, text: str) -> str | None:
        """The candidate program: the last python block (else the last fenced block, else
        the whole reply), or None when it does not define the function asked for."""
        blocks = fenced_code_blocks(text)
        python = [code for language, code in blocks if language in ("python", "py", "python3", "py3")]
        code = python[-1] if python else blocks[-1][1] if blocks else text
        return code.strip() + "\n" if re.search(r"^\s*def\s+\w+\s*\(", code, re.MULTILINE) else None

    def extract(self, problem, text):
        return self.code(text)

    def check(self, problem, text):
        from thinkwise.tasks.sandbox import CodeTestVerifier

        code = self.code(text)
        if code is None or not re.search(rf"\bdef\s+{problem.data['function']}\s*\(", code):
            return False  # no sandbox run for replies without the function
        return CodeTestVerifier(problem.data["tests"]).score("", f"```python\n{code}```") == 1.0

    def reference_response(self, problem):
        return f"```python\n{problem.reference}```"


BLOCK_KINDS = ("loop", "branch", "append", "while", "helper", "swap", "filter", "text")


def _program(level: int, rng: random.Random) -> str:
    """A small program: three variables, a helper, `level` blocks of logic, then one print."""
    m = rng.randint(50, 97)
    lines = ["def f(v):", f"    return (v * {rng.randint(2, 5)} + {rng.randint(1, 9)}) % {m}", "",
             f"x = {rng.randint(1, 9)}", f"y = {rng.randint(1, 9)}", "acc = []", f"s = '{rng.choice('pqr')}'"]
    for _ in range(level):
        kind = rng.choice(BLOCK_KINDS)
        if kind == "loop":
            lines += [f"for i in range({rng.randint(2, 4)}):",
                      f"    x = (x * {rng.randint(2, 3)} + i) % {rng.randint(50, 97)}"]
        elif kind == "branch":
            lines += [f"if x % {rng.randint(2, 3)} == 0:", "    y = y + x", "else:",
                      f"    y = y - {rng.randint(1, 5)}"]
        elif kind == "append":
            lines += ["acc.append(x - y)"]
        elif kind == "while":
            lines += [f"while x > {rng.randint(3, 12)}:", "    x = x // 2", "    y += 1"]
        elif kind == "helper":
            lines += [f"y = f(y) - {rng.randint(0, 9)}"]
        elif kind == "swap":
            lines += [f"x, y = y % {rng.randint(20, 60)}, x + {rng.randint(1, 5)}"]
        elif kind == "filter":
            lines += ["acc = [v for v in acc + [x, y] if v % 2 == 0]"]
        else:
            lines += [f"s = s + 'ab'[x % 2] * {rng.randint(1, 2)}"]
    lines.append("print(x, y, sum(acc), s)")
    return "\n".join(lines)


@register
class OutputPredictionFamily(TaskFamily):
    name, description = "output", "predict what a small Python program prints (level = blocks of logic)"
    min_level, max_level, default_levels = 1, 12, (2, 4, 8)

    def reasoning_tokens(self, level):
        return 128 + 48 * level
    builtins = {"range": range, "print": print, "sum": sum, "len": len}

    def make(self, level, rng):
        program = _program(level, rng)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(program, {"__builtins__": dict(self.builtins)})
        output = buffer.getvalue().strip()
        prompt = (f"What does this Python program print?\n```python\n{program}\n```\n"
                  f"{ANSWER_FORMAT} Give the printed line exactly.")
        return prompt, output, {"program": program}

    def extract(self, problem, text):
        """The printed line after the last `Answer:` (on the same line, the next one, or
        inside a fenced block there), else the last \\boxed{}."""
        markers = list(ANSWER_MARKER.finditer(text))
        answer = None
        if markers:
            rest = text[markers[-1].end():]
            blocks = fenced_code_blocks(rest)
            if blocks and rest.lstrip().startswith(("```", "~~~")):
                answer = next((line for line in blocks[0][1].split("\n") if line.strip()), None)
            else:
                answer = extract_answer(text, "answer_line")
        if answer is None:
            answer = extract_answer(text, "boxed")
        if answer is None:
            return None
        answer = " ".join(answer.strip().strip("`'\"").split())
        return answer or None

    def check(self, problem, text):
        answer = self.extract(problem, text)
        return answer is not None and answer_key(answer) == answer_key(problem.reference)

    def reference_response(self, problem: Problem) -> str:
        return f"Tracing it through.\nAnswer: {problem.reference}"
