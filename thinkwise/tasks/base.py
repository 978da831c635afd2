"""What a verifiable task is: a seeded generator with a difficulty knob and an exact checker.

A `TaskFamily` turns (level, seed) into a `Problem`, deterministically: the prompt says
what to answer and in which form, but never contains the answer; `reference` is the
canonical answer. `extract` reads a model's full response into the canonical form that
votes are grouped by, and `check` decides correctness exactly (for puzzles, by
simulating the proposed moves; for constraint problems, by testing the proposed
solution, so any valid answer counts). Families register themselves by name; task specs
such as "hanoi:3-6,sum:2-5" pick families and levels for a benchmark run.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks.extraction import answer_key, answers_equal, extract_answer

ANSWER_FORMAT = "End your reply with a final line of the form `Answer: <your answer>`."


@dataclass(frozen=True)
class Problem:
    family: str
    level: int
    seed: int
    prompt: str
    reference: str
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return f"{self.family}:{self.level}:{self.seed}"


class TaskFamily:
    """Base: a numeric (or short string) answer on an `Answer:` line, compared exactly."""

    name = ""
    description = ""
    min_level = 1
    max_level = 10
    default_levels: tuple[int, ...] = (1, 2, 3)

    def generate(self, level: int, seed: int) -> Problem:
        if not self.min_level <= level <= self.max_level:
            raise InvalidParameterError(
                f"task {self.name!r} has levels {self.min_level}..{self.max_level}, got {level}", param="tasks")
        rng = random.Random(f"{self.name}:{level}:{seed}")
        prompt, reference, data = self.make(level, rng)
        return Problem(self.name, level, seed, prompt, reference, data)

    def make(self, level: int, rng: random.Random) -> tuple[str, str, dict]:
        raise NotImplementedError

    def extract(self, problem: Problem, text: str) -> str | None:
        answer = extract_answer(text, "auto")
        return answer_key(answer) if answer is not None else None

    def check(self, problem: Problem, text: str) -> bool:
        return answers_equal(self.extract(problem, text), problem.reference)

    def reference_response(self, problem: Problem) -> str:
        return f"Working it out step by step.\nAnswer: {problem.reference}"


FAMILIES: dict[str, TaskFamily] = {}


def register(family_class: type[TaskFamily]) -> type[TaskFamily]:
    FAMILIES[family_class.name] = family_class()
    return family_class


def get_family(name: str) -> TaskFamily:
    _load_families()
    if name not in FAMILIES:
        raise InvalidParameterError(f"unknown task family {name!r}; known: {', '.join(sorted(FAMILIES))}",
                                    param="tasks")
    return FAMILIES[name]


def _load_families() -> None:
    # Importing the modules registers their families.
    from thinkwise.tasks import arithmetic, code, puzzles, sequences  # noqa: F401


def answer_line(text: str) -> str | None:
    """The raw text after the last `Answer:` marker (up to the end of that line), or the
    content of the last \\boxed{}; None when neither is there."""
    boxed = extract_answer(text, "boxed")
    line = extract_answer(text, "answer_line")
    return line if line is not None else boxed


def parse_task_spec(spec: str) -> list[tuple[str, list[int]]]:
    """"hanoi:3-6,sum:2,median" -> [("hanoi", [3,4,5,6]), ("sum", [2]), ("median", defaults)];
    "jsonl:path" -> [("jsonl:path", [0])]."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("jsonl:"):
            out.append((part, [0]))
            continue
        name, _, levels = part.partition(":")
        family = get_family(name)
        if not levels:
            chosen = list(family.default_levels)
        elif m := re.fullmatch(r"(\d+)-(\d+)", levels):
            chosen = list(range(int(m[1]), int(m[2]) + 1))
        elif re.fullmatch(r"\d+(?:/\d+)*", levels):
            chosen = [int(x) for x in levels.split("/")]
        else:
            raise InvalidParameterError(f"bad levels {levels!r} in task spec {part!r}; use e.g. {name}:2-5 or {name}:3",
                                        param="tasks")
        for level in chosen:
            if not family.min_level <= level <= family.max_level:
                raise InvalidParameterError(
                    f"task {name!r} has levels {family.min_level}..{family.max_level}, got {level}", param="tasks")
        out.append((name, chosen))
    if not out:
        raise InvalidParameterError("empty task spec; e.g. --tasks hanoi:3-5,sum:2-4", param="tasks")
    return out


def generate_problems(spec: str, n_per_level: int, seed: int = 0) -> list[Problem]:
    problems = []
    for name, levels in parse_task_spec(spec):
        if name.startswith("jsonl:"):
            problems += load_jsonl(name[len("jsonl:"):])[:n_per_level] if n_per_level else load_jsonl(name[6:])
            continue
        family = get_family(name)
        for level in levels:
            problems += [family.generate(level, seed * 100_003 + i) for i in range(n_per_level)]
    return problems


class JsonlFamily(TaskFamily):
    """User problems from a JSONL file: {"prompt", "answer"} (numbers compared numerically,
    other answers as normalised strings) or with "checker": the name of a family whose
    checker should judge them (its `data` may come in "data")."""

    name = "jsonl"

    def _delegate(self, problem: Problem) -> TaskFamily | None:
        checker = problem.data.get("checker")
        return get_family(checker) if checker else None

    def extract(self, problem, text):
        family = self._delegate(problem)
        return family.extract(problem, text) if family else super().extract(problem, text)

    def check(self, problem, text):
        family = self._delegate(problem)
        return family.check(problem, text) if family else super().check(problem, text)


FAMILIES["jsonl"] = JsonlFamily()


def load_jsonl(path: str) -> list[Problem]:
    file = Path(path)
    if not file.is_file():
        raise InvalidParameterError(f"task file {path!r} does not exist", param="tasks")
    problems = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidParameterError(f"{path}:{number} is not valid JSON ({error.msg})", param="tasks") from None
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise InvalidParameterError(f'{path}:{number} needs "prompt" and "answer" fields', param="tasks")
        data = dict(row.get("data") or {})
        if row.get("checker"):
            get_family(row["checker"])  # fail early on an unknown checker name
            data["checker"] = row["checker"]
        problems.append(Problem("jsonl", int(row.get("level", 0)), number, str(row["prompt"]), str(row["answer"]), data))
    return problems


def check(problem: Problem, text: str) -> bool:
    return get_family(problem.family).check(problem, text)


def extract(problem: Problem, text: str) -> str | None:
    return get_family(problem.family).extract(problem, text)
