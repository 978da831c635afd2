"""Pulling the final answer out of a completion, and deciding when two answers agree.

Methods, chosen per call: "boxed" (the last `\\boxed{...}`, braces balanced),
"answer_line" (text after the last "Answer:" / "answer is" / "Final answer:"),
"last_number", "choice" (a letter A-E), "code" (the last fenced code block), and
"auto" (boxed, then answer line, then last number). Numbers compare numerically —
"1,000", "1000.0", "1e3" are one answer and "0.5" equals "1/2" — so votes are not
split by formatting; `answer_key` gives the canonical form votes are grouped by.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from thinkwise.errors import InvalidParameterError

METHODS = ("auto", "boxed", "answer_line", "last_number", "choice", "code")

_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_ANSWER_MARKER = re.compile(r"(?:final answer|answer is|answer)\s*[:：]?\s*", re.IGNORECASE)
_CHOICE = re.compile(r"(?:\(([A-E])\)|\b(?:answer|option|choice)(?: is)?\s*[:：]?\s*\(?([A-E])\b|^\s*([A-E])[.)]?\s*$)",
                     re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def _answer_line(text: str) -> str | None:
    matches = list(_ANSWER_MARKER.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].split("\n", 1)[0]
    rest = rest.strip().strip("*").strip()
    rest = rest.rstrip(".").strip()
    return rest or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("−", "-").replace(" ", "") if numbers else None


def extract_answer(text: str, method: str = "auto") -> str | None:
    if method not in METHODS:
        raise InvalidParameterError(f"unknown answer extraction {method!r}; use one of {', '.join(METHODS)}",
                                    param="extract")
    if method == "boxed":
        return _last_boxed(text)
    if method == "answer_line":
        return _answer_line(text)
    if method == "last_number":
        return _last_number(text)
    if method == "choice":
        found = [next(g for g in m.groups() if g) for m in _CHOICE.finditer(text)]
        return found[-1].upper() if found else None
    if method == "code":
        blocks = _FENCE.findall(text)
        return blocks[-1].strip("\n") if blocks else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    line = _answer_line(text)
    if line is not None:
        number = _last_number(line)
        return number if number is not None and _parse_number(line) is not None else line
    return _last_number(text)


def _parse_number(text: str) -> Fraction | None:
    cleaned = text.strip().strip("$").strip().rstrip(".").replace(",", "").replace("−", "-").replace(" ", "")
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return Fraction(Fraction(numerator), Fraction(denominator))
        value = float(cleaned)
        if not math.isfinite(value):
            return None
        return Fraction(cleaned) if "e" not in cleaned.lower() else Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(answer: str) -> str:
    text = answer.strip().strip("$").strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", text).lower()


def answer_key(answer: str) -> str:
    """Canonical form: equal numbers share a key whatever their formatting."""
    number = _parse_number(answer)
    if number is not None:
        return f"#{number.numerator}/{number.denominator}"
    return normalize_answer(answer)


def answers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    x, y = _parse_number(a), _parse_number(b)
    if x is not None and y is not None:
        return x == y or math.isclose(float(x), float(y), rel_tol=1e-9)
    return normalize_answer(a) == normalize_answer(b)
