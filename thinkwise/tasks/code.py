"""Code families: write a function that passes hidden unit tests, and predict a program's output.

`code` (MBPP-style): a bank of small function specs, each instantiated with
seed-dependent constants; the prompt gives the name, signature and behaviour, the unit
tests stay hidden and run in the sandboxed runner (`verifiers.CodeTestVerifier`: time,
memory, process and file limits, no network, empty environment). The level picks
harder specs. `output` (SURGE-style): a generated straight-line/loop program whose
printed output the model must predict; the reference is computed by running the
program at generation time in a restricted namespace (deterministic, no imports).
"""

from __future__ import annotations

import contextlib
import io
import random

from thinkwise.tasks.base import ANSWER_FORMAT, Problem, TaskFamily, register
from thinkwise.tasks.extraction import answer_key, extract_answer

# (level, name, signature, description with {a}/{b} constants, reference body, argument generator)
SPECS = [
    (1, "scale_sum", "scale_sum(xs)", "return the sum of the list xs multiplied by {a}",
     "return sum(xs) * {a}", lambda r: [[r.randint(-9, 9) for _ in range(r.randint(0, 6))]]),
    (1, "count_multiples", "count_multiples(xs)", "return how many items of xs are divisible by {a}",
     "return sum(1 for x in xs if x % {a} == 0)", lambda r: [[r.randint(-30, 30) for _ in range(r.randint(0, 8))]]),
    (2, "shift_word", "shift_word(s)", "return s with every lowercase letter shifted {a} places forward in the "
     "alphabet, wrapping from z to a; other characters unchanged",
     "return ''.join(chr((ord(c) - 97 + {a}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
     lambda r: ["".join(r.choice("abcxyz -!Q") for _ in range(r.randint(0, 10)))]),
    (2, "clip_list", "clip_list(xs)", "return a new list where items below {a} become {a} and items above {b} become {b}",
     "return [min(max(x, {a}), {b}) for x in xs]", lambda r: [[r.randint(-20, 40) for _ in range(r.randint(0, 8))]]),
    (3, "run_lengths", "run_lengths(s)", "return a list of [character, run length] pairs for the maximal runs of "
     "equal characters in s, in order; items whose run length is at least {a} only",
     "out = []\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
     "            j += 1\n        if j - i >= {a}:\n            out.append([s[i], j - i])\n        i = j\n"
     "    return out", lambda r: ["".join(r.choice("aab") for _ in range(r.randint(0, 12)))]),
    (3, "kth_distinct", "kth_distinct(xs)", "return the {a}-th smallest distinct value of xs (1-based), or None if "
     "there are fewer than {a} distinct values",
     "d = sorted(set(xs))\n    return d[{a} - 1] if len(d) >= {a} else None",
     lambda r: [[r.randint(0, 9) for _ in range(r.randint(0, 9))]]),
]


@register
class CodeFamily(TaskFamily):
    name, description = "code", "write a Python function that passes hidden unit tests (level = spec difficulty)"
    min_level, max_level, default_levels = 1, 3, (1, 2, 3)

    def make(self, level, rng):
        specs = [s for s in SPECS if s[0] == level]
        _, name, signature, description, body, arguments = specs[rng.randrange(len(specs))]
        a = rng.randint(2, 5)
        constants = {"a": a, "b": a + rng.randint(5, 20)}
        source = f"def {name}({signature.split('(', 1)[1]}:\n    {body.format(**constants)}\n"
        namespace: dict = {}
        exec(source, namespace)  # our own reference code, to compute the expected values
        tests = []
        for _ in range(6):
            args = arguments(rng)
            tests.append(f"assert {name}(*{args!r}) == {namespace[name](*args)!r}")
        prompt = (f"Write a Python function `{signature}` that: {description.format(**constants)}. "
                  "Reply with the complete function in one ```python code block.")
        return prompt, source, {"tests": tests, "function": name}

    def extract(self, problem, text):
        return extract_answer(text, "code")

    def check(self, problem, text):
        from thinkwise.tasks.verifiers import CodeTestVerifier

        code = self.extract(problem, text)
        if not code:
            return False
        return CodeTestVerifier(problem.data["tests"]).score("", f"```python\n{code}\n```") == 1.0

    def reference_response(self, problem):
        return f"```python\n{problem.reference}```"


def _program(level: int, rng: random.Random) -> str:
    """A small program: a few assignments and `level` loop/branch blocks, then a print."""
    lines = [f"x = {rng.randint(1, 9)}", f"y = {rng.randint(1, 9)}", "acc = []"]
    for i in range(level):
        kind = rng.choice(["loop", "branch", "list"])
        if kind == "loop":
            lines += [f"for i in range({rng.randint(2, 4)}):", f"    x = (x * {rng.randint(2, 3)} + i) % {rng.randint(50, 97)}"]
        elif kind == "branch":
            lines += [f"if x % {rng.randint(2, 3)} == 0:", f"    y = y + x", "else:", f"    y = y - {rng.randint(1, 5)}"]
        else:
            lines += [f"acc.append(x - y)"]
    lines.append("print(x, y, sum(acc))")
    return "\n".join(lines)


@register
class OutputPredictionFamily(TaskFamily):
    name, description = "output", "predict what a small Python program prints (level = blocks of logic)"
    min_level, max_level, default_levels = 1, 8, (1, 3, 5)

    def make(self, level, rng):
        program = _program(level, rng)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(program, {"__builtins__": {"range": range, "print": print, "sum": sum}})
        output = buffer.getvalue().strip()
        prompt = (f"What does this Python program print?\n```python\n{program}\n```\n"
                  f"{ANSWER_FORMAT} Give the printed line exactly.")
        return prompt, output, {"program": program}

    def extract(self, problem, text):
        answer = extract_answer(text, "answer_line")
        return " ".join(answer.strip("`").split()) if answer else None

    def check(self, problem, text):
        answer = self.extract(problem, text)
        return answer is not None and answer_key(answer) == answer_key(problem.reference)

    def reference_response(self, problem: Problem) -> str:
        return f"Tracing it through.\nAnswer: {problem.reference}"
