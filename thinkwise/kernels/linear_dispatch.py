"""Heuristic GEMM dataflow for CPU (FlashDecoding++'s idea, applied to this machine).

A model has a handful of weight shapes, and which matrix-multiply implementation is
fastest depends on the shape and on M, the number of token rows in the step: one row
(batch-1 decode) is a memory-bound GEMV, a few rows (n samples decoding together) a
"flat GEMM", many rows (prefill) a compute-bound GEMM. On CPUs the candidates differ a
lot: PyTorch's bf16 kernels read half the bytes (best for one row) but scale linearly
with M on CPUs without native bf16 instructions, while an fp32 BLAS GEMM (numpy's
OpenBLAS; MKL is slow on AMD CPUs) amortises the weights over many rows. So at start-up
`LinearDispatcher.profile` times each candidate for each weight shape over a ladder of
M, sweeping every layer's weight of that shape so the timing sees DRAM, not cache, and
keeps a switch point per shape; at run time a lookup picks the implementation. The fp32
copy costs memory, so it is only made where a candidate needs it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

PROFILE_ROWS = (1, 2, 4, 8, 16)  # above 16 rows, the decision at 16 holds
PROFILE_LAYERS = 4  # weights swept per shape: enough to spill the last-level cache for big shapes


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run PyTorch's CPU ops on `count` threads inside the block (None: unchanged).

    PyTorch's OpenMP workers and OpenBLAS's workers spin-wait after their work; on a
    machine with few cores each pool then starves the other, and small element-wise
    ops measured 100x slower. Keeping PyTorch to one thread while BLAS uses the cores
    avoids that, and is restored on exit so other code in the process is unaffected.
    """
    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class DispatchLinear(nn.Module):
    """nn.Linear whose matmul may run in fp32 BLAS for larger M (CPU only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.blas_weight: np.ndarray | None = None  # fp32 [in, out] view or copy, for BLAS
        self.blas_from_rows: int | None = None  # use BLAS when rows >= this; None: never

    def enable_blas(self) -> None:
        weight = self.weight.detach()
        if weight.dtype == torch.float32:
            self.blas_weight = weight.numpy().T  # zero-copy transposed view
        else:
            self.blas_weight = np.ascontiguousarray(weight.float().numpy().T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.blas_from_rows is not None and rows >= self.blas_from_rows:
            out = torch.from_numpy(x.float().numpy() @ self.blas_weight)
            if self.bias is not None:
                out += self.bias
            return out.to(x.dtype)
        return nn.functional.linear(x, self.weight, self.bias)


@dataclass
class LinearDispatcher:
    """Per-weight-shape switch points, profiled on this machine at start-up."""

    table: dict[tuple[int, int], int | None] = field(default_factory=dict)  # (out, in) -> first M for BLAS
    timings_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @staticmethod
    def _time(layers: list[DispatchLinear], rows: int, dtype: torch.dtype, blas: bool) -> float:
        inputs = torch.randn(rows, layers[0].in_features).to(dtype)
        for layer in layers:
            layer.blas_from_rows = 1 if blas else None
        best = float("inf")
        with torch.inference_mode():
            layers[0](inputs)  # warm-up
            for _ in range(2):
                start = time.perf_counter()
                for layer in layers:
                    layer(inputs)
                best = min(best, (time.perf_counter() - start) * 1e3 / len(layers))
        return best

    def profile(self, model: nn.Module, dtype: torch.dtype) -> None:
        groups: dict[tuple[int, int], list[DispatchLinear]] = defaultdict(list)
        for module in model.modules():
            if isinstance(module, DispatchLinear):
                groups[(module.out_features, module.in_features)].append(module)
        for shape, layers in groups.items():
            for layer in layers:
                layer.enable_blas()
            sample = layers[:PROFILE_LAYERS]
            torch_ms = [self._time(sample, m, dtype, blas=False) for m in PROFILE_ROWS]
            blas_ms = [self._time(sample, m, dtype, blas=True) for m in PROFILE_ROWS]
            switch = None
            # First M from which BLAS wins at every larger profiled M as well.
            for i in range(len(PROFILE_ROWS)):
                if all(b < t for b, t in zip(blas_ms[i:], torch_ms[i:])):
                    switch = PROFILE_ROWS[i]
                    break
            self.table[shape] = switch
            self.timings_ms[f"{shape[0]}x{shape[1]}"] = {"rows": list(PROFILE_ROWS), "torch": [round(t, 3) for t in torch_ms],
                                                     "blas": [round(t, 3) for t in blas_ms]}
            for layer in layers:
                layer.blas_from_rows = switch
                if switch is None:
                    layer.blas_weight = None  # not used: free the fp32 copy

    def describe(self) -> dict:
        return {f"{o}x{i}": s for (o, i), s in self.table.items()}
