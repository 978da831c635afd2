"""Checks the command line runs before it loads a model, and "did you mean" suggestions.

Loading the default model takes seconds and gigabytes; a wrong port, device name,
strategy or task family found only afterwards wastes both. Every check here raises
`InvalidParameterError` with a one-line message that names the problem and the fix, so
`cli.main` prints it as `error: ...` with no traceback. Checks that need the model's
context length read only its configuration (config.json, or a GGUF's metadata), never
its weights.
"""

from __future__ import annotations

import difflib
import errno
import json
import re
import socket
from pathlib import Path

from thinkwise.errors import InvalidParameterError

DTYPE_CHOICES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
# Names users try for a GPU that torch does not know.
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "cuda1": "cuda:1", "apple": "mps"}


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """'; did you mean X?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


# ---------------------------------------------------------------------- strategies and tasks
def _strategy_candidates(name: str) -> list[str]:
    """Every strategy spelling built from the numbers the user typed, so a typo in the
    word ('majorty@8') is matched against the right-shaped correct form ('majority@8');
    the spellings come from the strategy registry."""
    from thinkwise.strategies import REGISTRY

    numbers = re.findall(r"\d+", name) or ["k"]
    first, last = numbers[0], numbers[-1]
    m = numbers[0] if len(numbers) > 1 else "m"
    return [spelling.format(first=first, last=last, m=m)
            for definition in REGISTRY.values() for spelling in definition.suggestions]


def check_strategy(name: str, **numbers):
    """`strategies.parse_strategy` with a "did you mean" added to an unknown name."""
    from thinkwise.strategies import parse_strategy

    try:
        return parse_strategy(name, **numbers)
    except InvalidParameterError as error:
        if error.message.startswith("unknown strategy"):
            hint = did_you_mean(name.strip().lower(), _strategy_candidates(name.strip().lower()))
            raise InvalidParameterError(error.message + hint, param="strategy") from None
        raise
    except ValueError:  # a number too odd for int(), e.g. 'majority@8x'
        raise InvalidParameterError(f"bad strategy {name!r}; e.g. majority@8, short-3@8, budget:512",
                                    param="strategy") from None


def check_task_spec(spec: str) -> None:
    """Families and levels of a `--tasks` spec, with "did you mean" for a misspelt family."""
    from thinkwise.tasks import FAMILIES, parse_task_spec

    for part in spec.split(","):
        name = part.strip().partition(":")[0].strip()
        if name and name != "jsonl" and name not in FAMILIES:
            known = sorted(n for n in FAMILIES if n != "jsonl")
            raise InvalidParameterError(
                f"unknown task family {name!r}{did_you_mean(name, known)} (known: {', '.join(known)}; "
                "see thinkwise bench --help)", param="tasks")
    parse_task_spec(spec)


# ---------------------------------------------------------------------- device and engine options
def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    from thinkwise.engine.config import resolve_device

    try:
        torch.device(device)
    except RuntimeError:
        alias = _DEVICE_ALIASES.get(device.strip().lower())
        hint = f"; did you mean {alias}?" if alias else did_you_mean(device, ["cpu", "cuda", "cuda:0", "mps"])
        raise InvalidParameterError(f"unknown device {device!r}{hint} (use cpu, cuda or cuda:N)",
                                    param="device") from None
    dev = resolve_device(device)  # raises when CUDA is asked for and none is visible
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidParameterError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                                    "use cuda:0 .. cuda:N-1", param="device")


def check_engine_options(options: dict) -> None:
    """Build the `EngineConfig` now: its own checks (>= 1, ranges) run before loading."""
    from thinkwise.engine.config import EngineConfig

    try:
        EngineConfig(**options)
    except InvalidParameterError as error:
        if (error.param or "").startswith("THINKWISE_"):  # an environment override: its message names it
            raise
        flag = "--" + {"num_kv_blocks": "kv-blocks"}.get(error.param or "", (error.param or "").replace("_", "-"))
        raise InvalidParameterError(f"{flag}: {error.message}", param=error.param) from None


# ---------------------------------------------------------------------- the model's context
def model_context_length(model: str, cache_dir: str | None = None) -> int | None:
    """The model's context length from its configuration alone (no weights), or None when
    the reference cannot be read that way (the loader then names the problem)."""
    from thinkwise.loading.gguf_reading import field_value, is_gguf_file, open_gguf

    try:
        if model == "default":
            from thinkwise.loading import resolve_default_model

            path = resolve_default_model(cache_dir=cache_dir, progress=True)
        else:
            path = Path(model).expanduser()
            if path.is_dir() and (path / "config.json").is_file():
                raw = json.loads((path / "config.json").read_text())
                raw = raw.get("text_config", raw)
                value = raw.get("max_position_embeddings")
                return int(value) if value else None
            if path.is_dir():
                ggufs = list(path.glob("*.gguf"))
                path = ggufs[0] if len(ggufs) == 1 else path
            if not path.is_file() or not is_gguf_file(path):
                return None
        reader = open_gguf(path)
        arch = field_value(reader, "general.architecture")
        value = field_value(reader, f"{arch}.context_length")
        return int(value) if value else None
    except (OSError, ValueError, TypeError):
        return None


def check_max_tokens(max_tokens: int, context: int | None, max_model_len: int | None, what: str = "--max-tokens") -> None:
    if max_tokens < 1:
        raise InvalidParameterError(f"{what} must be >= 1, got {max_tokens}", param="max_tokens")
    limit = min(x for x in (context, max_model_len) if x) if (context or max_model_len) else None
    if limit is not None and max_tokens >= limit:
        holds = f"the model's context holds {limit:,}" if limit == context else f"--max-model-len is {limit:,}"
        raise InvalidParameterError(
            f"{what} {max_tokens:,} leaves no room for the prompt: {holds} tokens (prompt + output); "
            f"pass {what} below {limit}", param="max_tokens")


# ---------------------------------------------------------------------- the server's address
def check_listen_address(host: str, port: int) -> None:
    """A valid port that is free on `host`, found by binding it the way uvicorn will."""
    if not 0 <= port <= 65535:
        raise InvalidParameterError(f"--port {port} is not a TCP port; use 1-65535 (or 0 for any free port)",
                                    param="port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise InvalidParameterError(f"--host {host!r} is not an address of this machine; use 127.0.0.1 (local) "
                                    "or 0.0.0.0 (all interfaces)", param="host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InvalidParameterError(f"port {port} on {host} is already in use; pick another with --port N "
                                            "(or --port 0 for any free port)", param="port") from None
            if error.errno == errno.EACCES:
                raise InvalidParameterError(f"no permission to bind port {port}; ports below 1024 need root, "
                                            "use e.g. --port 8000", param="port") from None
            raise InvalidParameterError(f"cannot listen on {host}:{port} ({error.strerror}); use --host 127.0.0.1 "
                                        "or an address of this machine", param="host") from None
