"""The strategy registry: one entry per strategy gives its name pattern, parameters, help and runner.

A strategy module calls `register(StrategyDef(...))` at import. Everything that names a
strategy reads the registry: `parse_strategy` (the Python API, the CLI, the bench, the
server's `thinkwise.strategy` and its model-name prefix), `run_strategy`, the help texts,
the CLI's generated `--<param>` flags and the server's `extra_body` fields. A strategy
string is `NAME` or `NAME(key=value, ...)`: the name's numbers fill the parameters its
pattern captures (`short-3@8`: m=3, k=8), the parenthesised options set any other
(`adaptive:16(round_size=2, threshold=0.9)`); keyword arguments to `parse_strategy` set
parameters too (that is how `--eta 10` and `{"eta": 10}` arrive). k, m and budget are
"fill-ins": they fill a placeholder letter in the name (`short-m@k`) and are ignored by
strategies without them, so one `--k 8` default serves every strategy; any other
argument a strategy does not take is an error naming it. Every value is range-checked
here, so a bad one is an `InvalidParameterError` naming the field before any work starts.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from thinkwise.errors import InvalidParameterError

if TYPE_CHECKING:
    from thinkwise.engine.sampling_params import SamplingParams
    from thinkwise.strategies.base import Answer, Backend

FILL_INS = ("k", "m", "budget")  # explicit arguments that fill a name's placeholder letters
PLACEHOLDERS = ("", "k", "m", "n")  # what a name may hold where a number goes, to be filled in
MAX_NAME_CHARS = 200
MAX_DIGITS = 12


@dataclass(frozen=True)
class Param:
    """One parameter of a strategy. `default` is a value, or a function of the other values
    (e.g. a warm-up size that depends on k); `low`/`high` bound it (`open_low`: low excluded)."""

    name: str
    kind: type  # int, float or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()

    def convert(self, raw: Any, strategy: str) -> Any:
        """`raw` (text from a strategy string, or a value from the API/CLI/JSON) as this type, checked."""
        where = f"{self.name} (of {strategy})"
        if isinstance(raw, bool):
            raise InvalidParameterError(f"{where} must be a number, not a boolean", param=self.name)
        if self.kind is str:
            value = str(raw).strip().lower()
            if value not in self.choices:
                raise InvalidParameterError(f"{where} must be one of {', '.join(self.choices)}, got {str(raw)[:40]!r}",
                                            param=self.name)
            return value
        if isinstance(raw, str):
            text = raw.strip()
            if len(text) > MAX_DIGITS + 8:
                raise InvalidParameterError(f"{where} is too long a number: {text[:24]!r}...", param=self.name)
            try:
                raw = int(text) if self.kind is int else float(text)
            except ValueError:
                raise InvalidParameterError(f"{where} must be {'an integer' if self.kind is int else 'a number'}, "
                                            f"got {text[:40]!r}", param=self.name) from None
        if self.kind is int:
            if isinstance(raw, float) and raw.is_integer():
                raw = int(raw)
            if not isinstance(raw, int):
                raise InvalidParameterError(f"{where} must be an integer, got {raw!r:.40}", param=self.name)
        elif not isinstance(raw, (int, float)) or raw != raw or raw in (float("inf"), float("-inf")):
            raise InvalidParameterError(f"{where} must be a finite number, got {raw!r:.40}", param=self.name)
        value = self.kind(raw)
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise InvalidParameterError(f"{where} must be in {self.range_text()}, got {value}", param=self.name)
        return value

    def range_text(self) -> str:
        if self.choices:
            return "{" + ", ".join(self.choices) + "}"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}{']' if self.high is not None else ')'}"


@dataclass
class StrategyRun:
    """What a runner gets: the backend, the parsed spec, the prompt and how to read answers."""

    backend: "Backend"
    spec: "StrategySpec"
    prompt: Any  # token ids (local) or messages/text/ids (remote)
    params: "SamplingParams"
    prompt_text: str
    extract: Callable[[str], str | None]
    verifier: Any = None


@dataclass(frozen=True)
class StrategyDef:
    """A strategy: its name `pattern` (a regex whose named groups are parameters), its
    parameters, a one-line `usage` and `help`, and the `runner` that executes it."""

    kind: str
    pattern: str
    usage: str  # e.g. "majority@K"
    help: str
    runner: Callable[[StrategyRun], Awaitable["Answer"]]
    params: tuple[Param, ...] = ()
    needs_verifier: bool = False
    # Set when the strategy needs this process's engine (e.g. forks probes): the reason, for the error.
    local_only: str | None = None
    deterministic: bool = False  # the same prompt gives the same answer (the bench runs it once)
    check: Callable[[dict[str, Any]], None] | None = None  # cross-parameter checks
    suggestions: tuple[str, ...] = ()  # spellings for "did you mean": {first}, {last}, {m} are the typed numbers

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


REGISTRY: dict[str, StrategyDef] = {}


def register(definition: StrategyDef) -> StrategyDef:
    if definition.kind in REGISTRY:
        raise ValueError(f"strategy {definition.kind!r} is registered twice")
    re.compile(definition.pattern)
    REGISTRY[definition.kind] = definition
    return definition


@dataclass
class StrategySpec:
    """A parsed strategy: its kind and every parameter's value (`spec.k`, `spec.eta`, ...)."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in _SPEC_DEFAULTS:  # every spec answers k, m and budget (greedy: k=1)
            return _SPEC_DEFAULTS[name]
        raise AttributeError(f"strategy {self.__dict__.get('kind')!r} has no parameter {name!r}")

    @property
    def definition(self) -> StrategyDef:
        return REGISTRY[self.kind]


_SPEC_DEFAULTS = {"k": 1, "m": 1, "budget": 0}


def strategy_help(verbose: bool = False) -> str:
    """The usages, comma-separated; `verbose`: one line per strategy with its help and parameters."""
    if not verbose:
        return ", ".join(d.usage for d in REGISTRY.values())
    lines = []
    for d in REGISTRY.values():
        options = ", ".join(f"{p.name}={_default_text(p)}" for p in d.params if p.name not in FILL_INS)
        lines.append(f"  {d.usage:<24} {d.help}" + (f" [options: {options}]" if options else ""))
    return "\n".join(lines)


def _default_text(p: Param) -> str:
    return "auto" if callable(p.default) else str(p.default)


def option_params() -> list[Param]:
    """Every parameter other than the fill-ins, once by name (the CLI's flags, the server's fields)."""
    seen: dict[str, Param] = {}
    for d in REGISTRY.values():
        for p in d.params:
            if p.name not in FILL_INS and p.name not in seen:
                seen[p.name] = p
    return list(seen.values())


def split_strategies(text: str) -> list[str]:
    """A comma-separated list of strategies, where commas inside `(...)` separate options."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _split_options(name: str, text: str) -> tuple[str, dict[str, str]]:
    match = re.fullmatch(r"([^()]*)\(([^()]*)\)", text)
    if match is None:
        if "(" in text or ")" in text:
            raise InvalidParameterError(f"strategy {name!r}: options go in one pair of parentheses, e.g. "
                                        "deepconf@16(eta=10, tau=0.95)", param="strategy")
        return text, {}
    options: dict[str, str] = {}
    for item in match[2].split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*", key) or not value.strip():
            raise InvalidParameterError(f"strategy {name!r}: option {item.strip()[:40]!r} is not key=value",
                                        param="strategy")
        if key in options:
            raise InvalidParameterError(f"strategy {name!r}: option {key} is given twice", param=key)
        options[key] = value.strip()
    return match[1].strip(), options


def parse_strategy(name: str, **arguments: Any) -> StrategySpec:
    """Parse a strategy string; `arguments` (None: not given) set parameters, k/m/budget fill placeholders."""
    if not isinstance(name, str):
        raise InvalidParameterError(f"a strategy is a string such as 'majority@8', got {type(name).__name__}",
                                    param="strategy")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidParameterError(f"strategy name is {len(name)} characters long; at most {MAX_NAME_CHARS}",
                                    param="strategy")
    text = name.strip().lower()
    base, options = _split_options(name, text)
    for definition in REGISTRY.values():
        match = re.fullmatch(definition.pattern, base)
        if match is not None:
            return _bind(definition, name, match.groupdict(), options, arguments)
    raise InvalidParameterError(f"unknown strategy {name!r}; known: {strategy_help()}", param="strategy")


def _bind(d: StrategyDef, name: str, captured: dict[str, str | None], options: dict[str, str],
          arguments: dict[str, Any]) -> StrategySpec:
    given = {key: value for key, value in arguments.items() if value is not None}
    for key in list(given) + list(options):
        if d.param(key) is None and key not in FILL_INS:
            known = ", ".join(p.name for p in d.params) or "none"
            raise InvalidParameterError(f"{key} is not a parameter of {d.usage} (its parameters: {known})", param=key)
    values: dict[str, Any] = {}
    for p in d.params:
        in_name = captured.get(p.name)
        if in_name is not None and in_name not in PLACEHOLDERS:
            if p.name in options or (p.name not in FILL_INS and p.name in given
                                     and p.convert(given[p.name], d.usage) != p.convert(in_name, d.usage)):
                raise InvalidParameterError(f"{p.name} is given both in the name {name!r} and as an option",
                                            param=p.name)
            values[p.name] = p.convert(in_name, d.usage)
        elif p.name in options:
            if p.name in given and p.name not in FILL_INS and p.convert(given[p.name], d.usage) != \
                    p.convert(options[p.name], d.usage):
                raise InvalidParameterError(f"{p.name} is given twice with different values", param=p.name)
            values[p.name] = p.convert(options[p.name], d.usage)
        elif p.name in given:
            values[p.name] = p.convert(given[p.name], d.usage)
        elif in_name is not None or (p.name in captured and p.default is None):
            raise InvalidParameterError(f"strategy {name!r} needs {p.name}; pass it (e.g. --{p.name} 8)",
                                        param=p.name)
    for p in d.params:  # defaults last: they may depend on the values given
        if p.name not in values:
            default = p.default(values) if callable(p.default) else p.default
            if default is None:
                raise InvalidParameterError(f"strategy {name!r} needs {p.name}; pass it (e.g. --{p.name} 8)",
                                            param=p.name)
            values[p.name] = p.convert(default, d.usage)
    if d.check is not None:
        d.check(values)
    return StrategySpec(d.kind, values)


def model_prefix_strategy(prefix: str, **arguments: Any) -> StrategySpec:
    """A strategy named as a model-name prefix: a strategy string, or one whose placeholder
    letters are followed by their numbers (`short-m@k-8-3` is short-m@k with k=8, m=3)."""
    match = re.fullmatch(r"(.*?[a-z@:])((?:-\d{1,12})+)", prefix.strip().lower())
    if match is not None:
        base = match[1]
        letters = re.findall(r"(?<=[@:-])([kmn])(?![a-z0-9])", base)
        # Filled in the order k, m (the documented short-m@k-K-M), whatever order the name has.
        order = sorted({"k" if x == "n" else x for x in letters}, key=("k", "m").index)
        numbers = [int(x) for x in match[2].strip("-").split("-")]
        if order and len(numbers) == len(order):
            return parse_strategy(base, **{**arguments, **dict(zip(order, numbers))})
    return parse_strategy(prefix, **arguments)


async def run_registered(run: StrategyRun) -> "Answer":
    definition = run.spec.definition
    if definition.needs_verifier and run.verifier is None:
        raise InvalidParameterError(f"{definition.usage} needs a verifier (an exact checker, e.g. --answer "
                                    "REFERENCE / thinkwise.answer, or code tests)", param="verifier")
    if definition.local_only and not getattr(run.backend, "is_local", False):
        raise InvalidParameterError(f"{definition.usage} cannot run over a remote server: {definition.local_only}",
                                    param="strategy")
    return await definition.runner(run)


# Parameters several strategies share.
def samples_param(default: Any = None, help: str = "samples (k)") -> Param:
    return Param("k", int, default, help, low=1, high=4096)


def check_m_le_k(values: dict[str, Any]) -> None:
    if not 1 <= values["m"] <= values["k"]:
        raise InvalidParameterError(f"short-m@k needs 1 <= m <= k, got m={values['m']}, k={values['k']}", param="m")
