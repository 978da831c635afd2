"""What the kernels ask of the GPU they launch on (cached: the answers never change)."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _multi_processor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (under the Triton interpreter
    any small number exercises the split-K and split-KV paths)."""
    if device.type != "cuda":
        return 4
    return _multi_processor_count(device.index if device.index is not None else torch.cuda.current_device())


def use_asm(device: torch.device) -> bool:
    """Whether kernels may take their inline-PTX paths: on CUDA, yes; under the Triton
    interpreter (which cannot run PTX) they take their plain-Triton twins of the same code."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
