"""Honest checking of code tests: what the sandbox is asked to evaluate, and the verdict outside it.

A test that is one `assert` of a single comparison (`assert f(3) == 6`, `assert x in y`)
or of a plain expression (`assert is_sorted(xs)`) is never run as a whole inside the
sandbox. The child is sent only the operand expressions (a literal side, the expected
value, stays here, so code in the sandbox cannot read it), evaluates them, and sends
them back as tagged plain data (`sandbox_child.plain`: exact builtin types only);
`verdict` rebuilds real builtins and compares them here. A returned object cannot
decide its own equality or truth. Other tests (several statements, test_* functions
with shared setup) run inside, with each asserted comparison rewritten to refuse
non-plain operands first.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any

_OPERATORS = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
    "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}
_SYMBOLS = {"Eq": "==", "NotEq": "!=", "Lt": "<", "LtE": "<=", "Gt": ">", "GtE": ">=", "In": "in",
            "NotIn": "not in"}
_NO_LITERAL = object()


@dataclass
class ValueCheck:
    """How to judge a values test: `op` over (left, right), or truth of one value when
    op is None. `literal` is the side kept here (`literal_side` "left"/"right"), or absent."""

    op: str | None
    literal: Any = _NO_LITERAL
    literal_side: str | None = None


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO_LITERAL


def split_test(source: str) -> tuple[list[str], ValueCheck] | None:
    """(expressions for the child, the check kept here) for a one-assert test, else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]).__name__ in _OPERATORS:
        op = type(test.ops[0]).__name__
        left, right = test.left, test.comparators[0]
        left_source, right_source = ast.get_source_segment(source, left), ast.get_source_segment(source, right)
        if left_source is None or right_source is None:
            return None
        right_value = _literal(right)
        if right_value is not _NO_LITERAL:
            return [left_source], ValueCheck(op, right_value, "right")
        left_value = _literal(left)
        if left_value is not _NO_LITERAL:
            return [right_source], ValueCheck(op, left_value, "left")
        return [left_source, right_source], ValueCheck(op)
    expression = ast.get_source_segment(source, test)
    return ([expression], ValueCheck(None)) if expression is not None else None


class MalformedValue(ValueError):
    pass


def from_plain(data: Any, depth: int = 0) -> Any:
    """Tagged plain data (as `sandbox_child.plain` writes it) -> builtins; strict, since
    code in the sandbox could forge any line."""
    if depth > 100 or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise MalformedValue("malformed value from the sandbox")
    tag, rest = data[0], data[1:]
    try:
        if tag == "none" and not rest:
            return None
        if tag == "bool" and len(rest) == 1 and isinstance(rest[0], bool):
            return rest[0]
        if tag == "int" and len(rest) == 1 and isinstance(rest[0], str) and len(rest[0]) < 1_000_000:
            return int(rest[0], 16)
        if tag == "float" and len(rest) == 1 and isinstance(rest[0], str):
            return float.fromhex(rest[0])
        if tag == "complex" and len(rest) == 2 and all(isinstance(x, str) for x in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag == "str" and len(rest) == 1 and isinstance(rest[0], str):
            return rest[0]
        if tag == "bytes" and len(rest) == 1 and isinstance(rest[0], str):
            return bytes.fromhex(rest[0])
        if tag in ("list", "tuple", "set", "frozenset") and len(rest) == 1 and isinstance(rest[0], list):
            items = [from_plain(item, depth + 1) for item in rest[0]]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and len(rest) == 1 and isinstance(rest[0], list):
            pairs = rest[0]
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
                raise MalformedValue("malformed dict from the sandbox")
            return {from_plain(k, depth + 1): from_plain(v, depth + 1) for k, v in pairs}
    except (ValueError, TypeError, OverflowError) as error:  # unhashable key, bad hex
        raise MalformedValue(f"malformed value from the sandbox: {error}") from None
    raise MalformedValue(f"malformed value from the sandbox (tag {tag!r})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def verdict(check: ValueCheck, values: Any) -> tuple[bool, str | None]:
    """(passed, error) for a values test, judged here on rebuilt builtins."""
    expected_count = 1 if check.op is None or check.literal_side else 2
    if not isinstance(values, list) or len(values) != expected_count:
        return False, "malformed result from the sandbox"
    try:
        decoded = [from_plain(value) for value in values]
    except MalformedValue as error:
        return False, str(error)
    except RecursionError:
        return False, "malformed value from the sandbox (too deep)"
    if check.op is None:
        return (True, None) if decoded[0] else (False, f"AssertionError: value was {_short(decoded[0])}")
    if check.literal_side == "right":
        left, right = decoded[0], check.literal
    elif check.literal_side == "left":
        left, right = check.literal, decoded[0]
    else:
        left, right = decoded
    try:
        passed = bool(_OPERATORS[check.op](left, right))
    except Exception as error:  # e.g. '<' between str and int, `in` on an int
        return False, f"{type(error).__name__}: {error}"
    if passed:
        return True, None
    return False, f"AssertionError: {_short(left)} {_SYMBOLS[check.op]} {_short(right)} is false"
