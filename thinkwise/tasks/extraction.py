"""Pulling the final answer out of a completion, and deciding when two answers agree.

`extract_answer(text, method)` reads one answer from a completion; the method is chosen
per call: "boxed" (the last balanced `\\boxed{...}`), "answer_line" (the text after the
last "Answer:" / "answer is" / "Final answer:" marker), "last_number" (the last number,
with signs, thousands separators, decimals, fractions and scientific notation),
"choice" (a letter A-E), "code" (the last fenced code block) and "auto" (boxed, then
answer line, then last number). Only the answer part of a reasoning model's text is read
(`thinkwise.reasoning.answer_part`: after `</think>`; nothing while the block is open).
Votes must not split over formatting, so numbers compare as numbers: `answers_equal`
treats "1,000", "1000.0" and "1e3" as one answer and "0.5" as "1/2" (relative tolerance 1e-9), and `answer_key` gives the canonical key that votes are
grouped by; anything that is not a number compares as a normalized string (trimmed,
lowercased, whitespace collapsed, surrounding `$` and a trailing period removed).
"""

from __future__ import annotations

import re
import textwrap
from decimal import Context, Decimal
from fractions import Fraction

from thinkwise.errors import InvalidParameterError
from thinkwise.reasoning.parser import answer_part

__all__ = [
    "METHODS", "extract_answer", "normalize_answer", "answers_equal", "answer_key", "fenced_code_blocks",
    "parse_number",
]

METHODS = ("auto", "boxed", "answer_line", "last_number", "choice", "code")
CHOICE_LETTERS = "ABCDE"
RELATIVE_TOLERANCE = Fraction(1, 10**9)

# A number as people and models write it: optional sign (ASCII or Unicode minus), either
# comma-grouped thousands or plain digits, optional decimals (".5" too), optional
# exponent, optionally "/ denominator". Not glued to a word on either side, so "x2",
# "2x", "H2O" and "5th" are not numbers; a trailing sentence period is not part of it.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_NUMBER_CORE = rf"[-+\u2212]?(?:{_UNSIGNED})(?:\s*/\s*(?:{_UNSIGNED}))?"
NUMBER_IN_TEXT = re.compile(rf"(?<![\w.]){_NUMBER_CORE}(?!\w)")
_NUMBER_WHOLE = re.compile(rf"\s*({_NUMBER_CORE})\s*")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_MAX_EXPONENT = 400  # larger exponents are not answers, and 10**huge would stall Fraction

# "Answer:", "**Answer:**", "**Final Answer**:", "answer is", "answer is:".
ANSWER_MARKER = re.compile(
    r"\banswer\s*(?:\*\*|__)?\s*[:\uff1a]|\banswer\s+is\b\s*[:\uff1a]?", re.IGNORECASE)
_CHOICE_PATTERNS = (
    re.compile(r"\(([A-E])\)"),
    re.compile(r"(?i:\b(?:answer|option|choice)(?:\s+is)?\s*(?:\*\*|__)?\s*[:\uff1a]?\s*(?:\*\*|__)?\s*)"
               r"\(?([A-E])\)?(?!\w)"),
    re.compile(r"\\boxed\s*\{\s*\(?([A-E])\)?\s*\}"),
    re.compile(r"^[ \t]*(?:\*\*)?\(?([A-E])\)?[.):]?(?:\*\*)?[ \t]*$", re.MULTILINE),
)
_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s{}$]+)")


def extract_answer(text: str, method: str = "auto") -> str | None:
    """The answer in `text` by `method` (see METHODS), or None when there is none."""
    if method not in METHODS:
        raise InvalidParameterError(
            f"unknown answer extraction method {method!r}; use one of {', '.join(METHODS)}", param="extract")
    text = answer_part(text)  # a reasoning model's answer, not numbers from its thinking
    if not text:
        return None
    if method == "boxed":
        return _last_boxed(text)
    if method == "answer_line":
        return _answer_line(text)
    if method == "last_number":
        return _last_number(text)
    if method == "choice":
        return _last_choice(text)
    if method == "code":
        blocks = fenced_code_blocks(text)
        return blocks[-1][1] if blocks else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    line = _answer_line(text)
    if line is not None:
        # "The answer is 18 dollars." should vote with "18": a line holding exactly one
        # number answers with it; "(2, 3)" or "x^2 + 1" stay whole.
        numbers = NUMBER_IN_TEXT.findall(_LATEX_FRACTION.sub(r"\1\2/\3", line))
        return _clean_number(numbers[0]) if len(numbers) == 1 else line
    return _last_number(text)


def fenced_code_blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced (``` or ~~~) code block as (language tag, content), in order.

    An unterminated last block counts: generation often stops on the closing fence
    itself (it is a common stop string), so the fence never reaches the text.
    """
    lines = text.split("\n")
    blocks: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        language = info.split()[0].strip("{}.").lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if len(stripped) >= len(fence) and set(stripped) == {fence[0]}:
                break
            body.append(lines[j])
            j += 1
        blocks.append((language, textwrap.dedent("\n".join(body))))
        i = j + 1
    return blocks


def _last_boxed(text: str) -> str | None:
    # The last *balanced* one: a completion cut off inside a final \boxed{ falls back
    # to the previous, complete one.
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:j].strip()
    bare = _BOXED_BARE.findall(text)
    return bare[-1] if bare else None


def _answer_line(text: str) -> str | None:
    markers = list(ANSWER_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end():]
    first, _, after = rest.partition("\n")
    if not _strip_line(first):
        # "Answer:\n42": the answer is on the next non-empty line.
        first = next((line for line in after.split("\n") if _strip_line(line)), "")
    return _strip_line(first) or None


def _strip_line(line: str) -> str:
    previous = None
    while previous != line:
        previous = line
        line = line.strip()
        for marker in ("**", "__"):
            if line.startswith(marker):
                line = line[len(marker):]
            if line.endswith(marker):
                line = line[: -len(marker)]
        line = line.rstrip(".").strip()
    return line


def _last_number(text: str) -> str | None:
    numbers = NUMBER_IN_TEXT.findall(_LATEX_FRACTION.sub(r"\1\2/\3", text))
    return _clean_number(numbers[-1]) if numbers else None


def _clean_number(number: str) -> str:
    """Normalized spelling: no thousands separators, ASCII minus, no plus, no spaces."""
    cleaned = number.replace(",", "").replace("\u2212", "-").replace(" ", "").replace("\t", "")
    return cleaned[1:] if cleaned.startswith("+") else cleaned


def _last_choice(text: str) -> str | None:
    found = [(m.start(1), m.group(1)) for pattern in _CHOICE_PATTERNS for m in pattern.finditer(text)]
    return max(found)[1] if found else None


def _strip_wrappers(answer: str) -> str:
    """Remove what does not change an answer: outer whitespace, `$`/`\\(\\)` math
    delimiters, markdown bold, a whole-answer `\\boxed{}` or `\\text{}`, a trailing period.
    Repeated to a fixed point so normalization is idempotent."""
    previous = None
    text = answer
    while previous != text:
        previous = text
        text = text.strip().strip("$")  # math delimiters and currency signs alike
        for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
                text = text[len(left): len(text) - len(right)]
        for command in ("\\boxed{", "\\text{", "\\textbf{", "\\mathrm{"):
            if text.startswith(command) and text.endswith("}") and _balanced(text[len(command):-1]):
                text = text[len(command):-1]
        text = text.rstrip(".")
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


def normalize_answer(answer: str) -> str:
    """Trimmed, lowercased, whitespace collapsed, without surrounding `$` or a trailing period."""
    return re.sub(r"\s+", " ", _strip_wrappers(answer)).lower()


def parse_number(answer: str | None) -> Fraction | None:
    """The exact value of an answer that is a number ("1,234", "-3.50", "1/2", "1e3",
    "\\frac{1}{2}", "50%", "x = 5"), else None."""
    if answer is None:
        return None
    text = normalize_answer(answer)
    assignment = re.fullmatch(r"[a-z]\w*\s*=\s*(.+)", text)
    if assignment:
        text = assignment[1]
    text = text.replace("\\!", "").replace("\\,", ",").replace("{,}", ",")
    text = re.sub(r"\s*\\?%$", "", text)
    text = _LATEX_FRACTION.sub(r"\1\2/\3", text)
    match = _NUMBER_WHOLE.fullmatch(text)
    if match is None:
        return None
    cleaned = _clean_number(match[1])
    negative = cleaned.startswith("-")
    numerator, _, denominator = cleaned.lstrip("-").partition("/")
    try:
        value = _exact(numerator)
        if denominator:
            value /= _exact(denominator)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return -value if negative else value


def _exact(number: str) -> Fraction:
    exponent = re.search(r"[eE]([-+]?\d+)$", number)
    if exponent and abs(int(exponent[1])) > _MAX_EXPONENT:
        raise ValueError("exponent out of range")
    return Fraction(number)  # exact for decimals and exponents, unlike float


def answers_equal(a: str | None, b: str | None) -> bool:
    """True when both answers are given and agree: numerically (relative tolerance
    1e-9) when both are numbers, else as normalized strings."""
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        # Compared in exact arithmetic: floats would overflow on 1e400 and lose 1/3.
        return abs(x - y) <= RELATIVE_TOLERANCE * max(abs(x), abs(y))
    if (x is None) != (y is None):
        return False
    return normalize_answer(a) == normalize_answer(b)


def answer_key(answer: str) -> str:
    """Canonical key: answers with equal keys are equal per `answers_equal`.

    Integers below 1e15 key to their exact digits ("1000" for "1,000", "1e3", "1000.0");
    other numbers to 12 significant digits ("0.5" for "1/2", "0.333333333333" for "1/3"),
    which is finer than the comparison's 1e-9 tolerance, so a shared key always means
    equal; two numbers within tolerance can still straddle a rounding boundary. Keys of
    numbers always parse as numbers and keys of other answers never do, so the two
    kinds never collide.
    """
    value = parse_number(answer)
    if value is None:
        return normalize_answer(answer)
    if value.denominator == 1 and abs(value.numerator) < 10**15:
        return str(value.numerator)
    rounded = Context(prec=12).divide(Decimal(value.numerator), Decimal(value.denominator))
    return format(rounded.normalize(), "g").lower()
