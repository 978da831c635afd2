"""The environment variables that override `EngineConfig` fields: the one place they are read.

Each kernel knob is an `EngineConfig` field; its variable, when set, overrides the field
for every engine the process builds (for A/B runs of benchmarks and tests without code
changes). The kernels never read the environment: the engine hands them their settings
(`kernel_settings.apply_kernel_settings`).

THINKWISE_ATTENTION      -> attention_backend     `auto` (Triton decode attention on CUDA) or `torch`
                                                 (the PyTorch reference everywhere)
THINKWISE_FUSED          -> fused_kernels         1: fused Triton element-wise kernels on CUDA; 0: twins
THINKWISE_GEMM_EPILOGUE  -> gemm_epilogue_fusion  1: SiLU(gate)*up in the Triton GEMM's epilogue; 0: apart
THINKWISE_PDL            -> pdl                   1: programmatic dependent launch (Hopper+); 0: plain
THINKWISE_PDL_MAX_ROWS   -> pdl_max_rows          the most token rows a step may have for PDL (64)
THINKWISE_CPU_WEIGHT_PREFETCH -> cpu_weight_prefetch_mib  MiB of weights prefetched between CPU
                                                 quantized matmuls (4; 0: off)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.cpu_quant_gemm import MAX_PREFETCH_MIB
from thinkwise.kernels.paged_attention import ATTENTION_BACKENDS


def _flag(name: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise InvalidParameterError(f"{name}={text!r}: use 1 (on) or 0 (off)", param=name)
    return text == "1"


def _rows(name: str, text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        rows = -1
    if rows < 0:
        raise InvalidParameterError(f"{name}={text!r}: use a whole number of rows >= 0, e.g. 64", param=name)
    return rows


def _mib(name: str, text: str) -> float:
    try:
        mib = float(text)
    except ValueError:
        mib = -1.0
    if not 0 <= mib <= MAX_PREFETCH_MIB:
        raise InvalidParameterError(f"{name}={text!r}: use a number of MiB from 0 (off) to {MAX_PREFETCH_MIB}, e.g. 4",
                                    param=name)
    return mib


def _attention(name: str, text: str) -> str:
    if text not in ATTENTION_BACKENDS:
        raise InvalidParameterError(f"{name}={text!r}: use {' or '.join(ATTENTION_BACKENDS)}", param=name)
    return text


# variable -> (EngineConfig field, parser); an error's `param` is the variable's name.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "THINKWISE_ATTENTION": ("attention_backend", _attention),
    "THINKWISE_FUSED": ("fused_kernels", _flag),
    "THINKWISE_GEMM_EPILOGUE": ("gemm_epilogue_fusion", _flag),
    "THINKWISE_PDL": ("pdl", _flag),
    "THINKWISE_PDL_MAX_ROWS": ("pdl_max_rows", _rows),
    "THINKWISE_CPU_WEIGHT_PREFETCH": ("cpu_weight_prefetch_mib", _mib),
}


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """{field: value} for each override variable that is set (a bad value is refused)."""
    environ = os.environ if environ is None else environ
    return {field: parse(name, environ[name]) for name, (field, parse) in ENV_OVERRIDES.items() if name in environ}
