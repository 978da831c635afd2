"""Programmatic dependent launch (PDL): let each decode kernel start before the previous one ends.

A batch-1 decode step is a chain of ~10 kernels per layer, each short (a few
microseconds) and each dependent on the one before. Launched normally, kernel n+1's
programs are scheduled only after every program of kernel n has exited and its writes
are flushed, so each boundary costs the launch latency plus the ramp-up of the next
kernel's first loads, with the GPU mostly idle. On Hopper and newer, a kernel launched
with the programmatic-stream-serialization attribute may start as soon as the previous
kernel's programs have all signalled `gdc_launch_dependents`; it then does the work that
reads nothing the previous kernel writes (for a GEMV: loading its first weight tile, which
no kernel writes) and blocks in `gdc_wait` until the previous kernel has completed and its
memory is visible. Each kernel signals its dependents at once (element-wise kernels,
attention) or right after its wait (GEMMs), so the next kernel's launch overlaps this one.
Every kernel in the chain waits before its first dependent read or any write, so
completion stays transitive: a kernel's completion implies its predecessors'.
CUDA-graph capture keeps the programmatic edges. Off on CPU, under TRITON_INTERPRET,
before compute capability 9.0, and with `EngineConfig.pdl` off (THINKWISE_PDL=0; results
are identical either way: only the scheduling differs), and for steps of more than
`EngineConfig.pdl_max_rows` rows (THINKWISE_PDL_MAX_ROWS). The engine sets both through
`configure`.

Measured on an H100 (benchmarks/gpu_throughput.py, same machine, PDL on vs off): Qwen3-0.6B
shape batch 1 742 -> 867 tok/s, Llama-3-8B shape batch 1 158.7 -> 161.5 (171 once the GEMM
table lets Triton win ties, see linear_dispatch), batch 8 1,251 -> 1,306, batch 64 unchanged
(7,400 -> 7,499). Also tried and dropped: pulling the next GEMM's weights into L2 before its
`gdc_wait` (`prefetch.global.L2`): no gain at any budget (8B batch 1: 171.4 tok/s without,
170.3 with 4 MiB, 164.6 with 16 MiB).
"""

from __future__ import annotations

import functools
import os

import torch


# PDL pays where kernels are short and the GPU idles at their boundaries (small decode
# batches); it was neutral at batch 64, and prefill steps (many rows) launch plainly.
DEFAULT_MAX_ROWS = 64

_enabled = True
_max_rows = DEFAULT_MAX_ROWS


def configure(enabled: bool = True, max_rows: int = DEFAULT_MAX_ROWS) -> None:
    """Turn PDL on or off and set its row limit, for every launch from now on (the engine
    calls this from its config before capturing graphs; tests and A/B runs may too)."""
    global _enabled, _max_rows
    _enabled, _max_rows = bool(enabled), int(max_rows)


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def max_rows() -> int:
    """The most token rows a step may have for its kernels to use PDL."""
    return _max_rows


def enabled() -> bool:
    """Whether PDL is switched on (`configure`); the device may still not support it."""
    return _enabled


def pdl_enabled(device: torch.device, rows: int = 1) -> bool:
    """Whether kernels on `device` for a step of `rows` token rows launch with PDL (read at
    each launch, so a `configure` call takes effect for the next graphs captured)."""
    # TRITON_INTERPRET is Triton's own switch (kernels run on the CPU), not a thinkwise knob.
    if device.type != "cuda" or not _enabled or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if rows > max_rows():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_supports(index)


def launch_options(device: torch.device, rows: int = 1) -> dict:
    """Extra keyword arguments for a Triton launch: `launch_pdl=True` where PDL is on, else none."""
    return {"launch_pdl": True} if pdl_enabled(device, rows) else {}


def kernel_args(device: torch.device, rows: int = 1) -> dict:
    """What a PDL-aware kernel launch takes: its `PDL` constexpr plus `launch_options`."""
    options = launch_options(device, rows)
    return {"PDL": bool(options), **options}
