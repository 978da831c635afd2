"""What a verifiable task is: a seeded generator with a difficulty knob and an exact checker.

A `TaskFamily` turns (level, seed) into a `Problem`, deterministically: the prompt says
what to answer and in which form, but never contains the answer; `reference` is the
canonical answer. A prompt style decides whether the model is asked to reason first
("cot": step by step, then the answer line) or to give the answer line alone ("direct");
each family states the token limit its levels need in either style. `extract` reads a
model's full response into the canonical form that
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
from thinkwise.tasks.extraction import ANSWER_MARKER, NUMBER_IN_TEXT, answer_key, answers_equal, extract_answer, \
    parse_number

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\b")
# "Step 2: ", "3. ", "- 4) " opening a line: a numbering, never the answer.
_LINE_NUMBERING = re.compile(r"^\s*(?:[-*]\s*)?(?:(?:step|move)\s*)?\d+\s*[.):]\s+", re.IGNORECASE)

ANSWER_FORMAT = "End your reply with a final line of the form `Answer: <your answer>`."
# What each prompt style adds after the family's question and answer format. "cot" lets the
# model reason before it commits (a test-time-compute bench must); "direct" forbids it.
PROMPT_STYLES = {
    "cot": "Think step by step first and show your working; then give your final answer in the form asked for "
           "above, at the very end of your reply.",
    "direct": "Give only the final answer in the form asked for above, without any working.",
}


@dataclass(frozen=True)
class Problem:
    family: str
    level: int
    seed: int
    prompt: str
    reference: str
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    style: str = "cot"  # the prompt style ("cot", "direct"; "file" for JSONL rows, used as written)

    @property
    def id(self) -> str:
        return f"{self.family}:{self.level}:{self.seed}"


class TaskFamily:
    """Base: a short answer on an `Answer:` line, compared with `answers_equal` (normalised
    text; numbers to 1e-9). Numeric families compare exactly instead (`NumericFamily`)."""

    name = ""
    description = ""
    min_level = 1
    max_level = 10
    default_levels: tuple[int, ...] = (1, 2, 3)
    cheap_check = True  # False where checking runs something costly (the code sandbox)

    def generate(self, level: int, seed: int, style: str = "cot") -> Problem:
        if not self.min_level <= level <= self.max_level:
            raise InvalidParameterError(
                f"task {self.name!r} has levels {self.min_level}..{self.max_level}, got {level}", param="tasks")
        check_prompt_style(style)
        rng = random.Random(f"{self.name}:{level}:{seed}")
        prompt, reference, data = self.make(level, rng)
        return Problem(self.name, level, seed, f"{prompt} {PROMPT_STYLES[style]}", reference, data, style)

    def answer_tokens(self, level: int) -> int:
        """Tokens the answer line itself needs (a move list grows with the level)."""
        return 32

    def reasoning_tokens(self, level: int) -> int:
        """Tokens of working a small model needs before answering at this level."""
        return 320

    def max_tokens(self, level: int, style: str = "cot") -> int:
        """The default decode limit for one sample: the answer, plus the working in "cot"
        style (a margin of 16 in "direct", for a sentence before the answer line)."""
        check_prompt_style(style)
        return self.answer_tokens(level) + (self.reasoning_tokens(level) if style == "cot" else 16)

    def make(self, level: int, rng: random.Random) -> tuple[str, str, dict]:
        raise NotImplementedError

    def extract(self, problem: Problem, text: str) -> str | None:
        answer = final_answer(text)
        return answer_key(answer) if answer is not None else None

    def check(self, problem: Problem, text: str) -> bool:
        return answers_equal(self.extract(problem, text), problem.reference)

    def reference_response(self, problem: Problem) -> str:
        return f"Working it out step by step.\nAnswer: {problem.reference}"


def check_prompt_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise InvalidParameterError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}",
                                    param="prompt_style")


def final_answer(text: str) -> str | None:
    """The answer a response ends with, never a number from its working: whichever of the
    last `Answer:` marker and the last \\boxed{} comes later; without either, the last
    number of the last non-empty line ("... so the total is 45."). A reply that reasons
    and stops mid-way (cut off by the token limit) so gives no answer unless its last line
    holds one."""
    markers = list(ANSWER_MARKER.finditer(text))
    boxes = list(_BOXED_START.finditer(text))
    marker_at = markers[-1].start() if markers else -1
    boxed_at = boxes[-1].start() if boxes else -1
    if boxed_at > marker_at:
        return extract_answer(text[boxed_at:], "boxed")
    if marker_at >= 0:
        return extract_answer(text[marker_at:], "auto")
    lines = [line for line in text.strip().split("\n") if line.strip()]
    return extract_answer(_LINE_NUMBERING.sub("", lines[-1]), "last_number") if lines else None


def numeric_answer(text: str) -> str | None:
    """The number a response answers with (`final_answer`). An answer that is a calculation
    ("Answer: 12 + 5 = 17") gives its last number, since small models often restate the
    sum before the result."""
    answer = final_answer(text)
    if answer is None or parse_number(answer) is not None:
        return answer
    numbers = NUMBER_IN_TEXT.findall(answer)
    return numbers[-1] if numbers else None


def exact_number_key(answer: str) -> str:
    """The exact value of a numeric answer as a canonical string: integers in full
    ("1,234" and "1.234e3" give "1234", however many digits), terminating decimals in
    full, other fractions as "p/q"; a non-number gives its normalised text. Unlike
    `answer_key`, nothing is rounded, so 3368750160 and 3368750161 stay apart."""
    value = parse_number(answer)
    if value is None:
        return answer_key(answer)
    if value.denominator == 1:
        return str(value.numerator)
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + f"{digits[:-places]}.{digits[-places:]}"


def numeric_key(text: str) -> str | None:
    """The exact key of the number a response answers with (see `numeric_answer`)."""
    answer = numeric_answer(text)
    return exact_number_key(answer) if answer is not None else None


def numbers_match(text: str, reference: str) -> bool:
    """Whether the response answers with exactly the reference number (as fractions: no
    tolerance, which the general `answers_equal` has and a 20-digit product must not)."""
    answer = numeric_key(text)
    value = parse_number(answer) if answer is not None else None
    return value is not None and value == parse_number(reference)


class NumericFamily(TaskFamily):
    """A family whose answer is one number, compared exactly."""

    def extract(self, problem: Problem, text: str) -> str | None:
        return numeric_key(text)

    def check(self, problem: Problem, text: str) -> bool:
        return numbers_match(text, problem.reference)


FAMILIES: dict[str, TaskFamily] = {}


def register(family_class: type[TaskFamily]) -> type[TaskFamily]:
    FAMILIES[family_class.name] = family_class()
    return family_class


def get_family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise InvalidParameterError(f"unknown task family {name!r}; known: {', '.join(sorted(FAMILIES))}",
                                    param="tasks")
    return FAMILIES[name]


def answer_blocks(text: str) -> list[str]:
    """Where a multi-part answer (a move list, a placement) may be, most specific first:
    everything after the last `Answer:` marker (move lists span lines), the content of
    the last \\boxed{}, and the whole response. Parsers take the first that parses."""
    blocks = []
    markers = list(ANSWER_MARKER.finditer(text))
    if markers:
        blocks.append(text[markers[-1].end():].strip())
    boxed = extract_answer(text, "boxed")
    if boxed is not None:
        blocks.append(boxed)
    blocks.append(text)
    return blocks


def answer_line(text: str) -> str | None:
    """The raw text after the last `Answer:` marker (up to the end of that line), or the
    content of the last \\boxed{}; None when neither is there."""
    boxed = extract_answer(text, "boxed")
    line = extract_answer(text, "answer_line")
    return line if line is not None else boxed


def parse_task_spec(spec: str) -> list[tuple[str, list[int]]]:
    """"hanoi:3-6,sum:2,median,queens:4/6/8" -> [("hanoi", [3, 4, 5, 6]), ("sum", [2]),
    ("median", its default levels), ("queens", [4, 6, 8])]; "jsonl:path" -> [("jsonl:path", [0])]."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("jsonl:"):
            if not part[len("jsonl:"):].strip():
                raise InvalidParameterError("task spec 'jsonl:' needs a file path, e.g. jsonl:mine.jsonl",
                                            param="tasks")
            out.append((part, [0]))
            continue
        name, _, levels = part.partition(":")
        name, levels = name.strip(), levels.replace(" ", "")
        family = get_family(name)
        if not levels:
            chosen = list(family.default_levels)
        elif m := re.fullmatch(r"(\d+)-(\d+)", levels):
            if int(m[1]) > int(m[2]):
                raise InvalidParameterError(f"empty level range {levels!r} in task spec {part!r}; write it low-high, "
                                            f"e.g. {name}:{m[2]}-{m[1]}", param="tasks")
            chosen = list(range(int(m[1]), int(m[2]) + 1))
        elif re.fullmatch(r"\d+(?:/\d+)*", levels):
            chosen = [int(x) for x in levels.split("/")]
        else:
            raise InvalidParameterError(f"bad levels {levels!r} in task spec {part!r}; use e.g. {name}:2-5, "
                                        f"{name}:3 or {name}:2/4/8", param="tasks")
        for level in chosen:
            if not family.min_level <= level <= family.max_level:
                raise InvalidParameterError(
                    f"task {name!r} has levels {family.min_level}..{family.max_level}, got {level}", param="tasks")
        out.append((name, chosen))
    if not out:
        raise InvalidParameterError("empty task spec; e.g. --tasks hanoi:3-5,sum:2-4", param="tasks")
    return out


def generate_problems(spec: str, n_per_level: int, seed: int = 0, style: str = "cot") -> list[Problem]:
    """Up to `n_per_level` distinct problems of every (family, level) in `spec`, the same for
    the same arguments. Problem i of a level has seed `seed * 100_003 + i` while seeds give
    new prompts; a seed that repeats an earlier prompt is skipped, and a family with fewer
    distinct instances at a level than asked (river crossing with N pairs has one) gives
    only those: repeats would count one problem several times. `shortfall` says which
    levels came short. A JSONL file in the spec gives its first `n_per_level` rows (all of
    them when n_per_level is 0), with their prompts as written."""
    if n_per_level < 0:
        raise InvalidParameterError(f"n_per_level must be >= 0, got {n_per_level}", param="n_per_level")
    check_prompt_style(style)
    problems = []
    for name, levels in parse_task_spec(spec):
        if name.startswith("jsonl:"):
            rows = load_jsonl(name[len("jsonl:"):].strip())
            problems += rows[:n_per_level] if n_per_level else rows
            continue
        family = get_family(name)
        for level in levels:
            prompts: set[str] = set()
            # Enough tries that a family with a handful of variants (Hanoi's six peg
            # pairs) shows them all, few enough that a one-instance level stays quick.
            for i in range(3 * n_per_level + 30):
                if len(prompts) == n_per_level:
                    break
                problem = family.generate(level, seed * 100_003 + i, style)
                if problem.prompt not in prompts:
                    prompts.add(problem.prompt)
                    problems.append(problem)
    return problems


def shortfall(problems: list[Problem], n_per_level: int) -> dict[tuple[str, int], int]:
    """(family, level) -> distinct problems generated, for levels with fewer than asked."""
    counts: dict[tuple[str, int], int] = {}
    for problem in problems:
        if problem.family != "jsonl":
            counts[(problem.family, problem.level)] = counts.get((problem.family, problem.level), 0) + 1
    return {key: count for key, count in counts.items() if count < n_per_level}


class JsonlFamily(TaskFamily):
    """User problems from a JSONL file: {"prompt", "answer"} (numbers compared numerically,
    other answers as normalised strings) or with "checker": the name of a family whose
    checker should judge them (its `data` may come in "data")."""

    name = "jsonl"
    description = "problems from a user JSONL file (jsonl:PATH)"
    min_level, max_level, default_levels = 0, 0, (0,)

    def generate(self, level: int, seed: int, style: str = "cot") -> Problem:
        raise InvalidParameterError("jsonl problems come from a file; use the task spec jsonl:PATH", param="tasks")

    def _delegate(self, problem: Problem) -> TaskFamily | None:
        checker = problem.data.get("checker")
        return get_family(checker) if checker else None

    def extract(self, problem, text):
        family = self._delegate(problem)
        if family:
            return family.extract(problem, text)
        if parse_number(problem.reference) is not None:
            return numeric_key(text)
        return super().extract(problem, text)

    def check(self, problem, text):
        family = self._delegate(problem)
        if family:
            return family.check(problem, text)
        if parse_number(problem.reference) is not None:
            return numbers_match(text, problem.reference)
        return super().check(problem, text)

    def reference_response(self, problem):
        family = self._delegate(problem)
        return family.reference_response(problem) if family else super().reference_response(problem)


FAMILIES["jsonl"] = JsonlFamily()


def load_jsonl(path: str) -> list[Problem]:
    """Problems of family "jsonl" from a file of JSON lines {"prompt", "answer"}, optionally
    with "checker" (a family name whose checker judges the row, e.g. "hanoi"), "data"
    (what that checker needs, e.g. {"disks": 3}) and "level" (an integer to group results
    by). Rows with a checker are validated now: the family must exist, and its checker
    must accept the row's own answer, so a broken file fails here and not mid-benchmark."""
    file = Path(path)
    if not file.is_file():
        raise InvalidParameterError(f"task file {path!r} does not exist", param="tasks")
    problems = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidParameterError(f"{where} is not valid JSON ({error.msg})", param="tasks") from None
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise InvalidParameterError(f'{where} needs "prompt" and "answer" fields', param="tasks")
        if not isinstance(row.get("data", {}), dict):
            raise InvalidParameterError(f'{where}: "data" must be a JSON object', param="tasks")
        level = row.get("level", 0)
        if not isinstance(level, int) or isinstance(level, bool):
            raise InvalidParameterError(f'{where}: "level" must be an integer, got {level!r}', param="tasks")
        data = dict(row.get("data") or {})
        problem = Problem("jsonl", level, number, str(row["prompt"]), str(row["answer"]), data, "file")
        if row.get("checker"):
            family = get_family(str(row["checker"]))  # an unknown name fails with the list of known ones
            data["checker"] = family.name
            _validate_row(where, family, problem)
        problems.append(problem)
    return problems


def _validate_row(where: str, family: TaskFamily, problem: Problem) -> None:
    if not family.cheap_check:
        return  # e.g. code: running the sandbox for every row at load time would be slow
    try:
        accepted = family.check(problem, family.reference_response(problem))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise InvalidParameterError(
            f"{where}: checker {family.name!r} cannot judge this row ({type(error).__name__}: {error}); give the "
            f'fields it needs in "data", as in {family.name} problems\' data', param="tasks") from None
    if not accepted:
        raise InvalidParameterError(f"{where}: checker {family.name!r} rejects the row's own answer; fix the answer "
                                    'or the "data" fields', param="tasks")


def check(problem: Problem, text: str) -> bool:
    return get_family(problem.family).check(problem, text)


def extract(problem: Problem, text: str) -> str | None:
    return get_family(problem.family).extract(problem, text)
