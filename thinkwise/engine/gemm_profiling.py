"""Start-up GEMM dispatch profiling: which matrix-multiply implementation each weight shape
uses at each row count on this machine (`kernels/linear_dispatch`), chosen once before the
runner captures CUDA graphs (they record whichever GEMM the table picks).
"""

from __future__ import annotations

from typing import Any

import torch

from thinkwise.engine.config import EngineConfig
from thinkwise.kernels.linear_dispatch import GpuLinearDispatcher, LinearDispatcher, torch_threads


def profile_gemm_dispatch(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, layercast: bool,
                          config: EngineConfig) -> tuple[Any, int | None]:
    """Profile and install the model's GEMM dispatch table. Returns what the run's metadata
    records of it (None: no table) and the PyTorch thread count for engine work on CPU
    (None: unchanged)."""
    if layercast:
        # One matmul implementation at every batch size (weights upcast, torch's fp32 GEMM):
        # a profiled table would make results depend on the rows in a step and on the run.
        return "off (compute_dtype differs from the weights' dtype)", None
    if device.type == "cpu" and config.cpu_gemm_dispatch:
        threads = config.cpu_torch_threads
        dispatcher = LinearDispatcher()
        with torch_threads(threads):
            dispatcher.profile(model, dtype, preset=config.cpu_gemm_table)
        if config.quantization is not None and all(v is None for v in dispatcher.table.values()):
            threads = None  # no BLAS in the step: the quantized kernels (linear_methods) get PyTorch's threads
        return {"blas_from_rows": dispatcher.describe(), "timings_ms": dispatcher.timings_ms}, threads
    if device.type == "cuda" and config.gpu_gemm_dispatch:
        gpu_dispatcher = GpuLinearDispatcher()
        gpu_dispatcher.profile(model, dtype)
        return gpu_dispatcher.describe(), None
    return None, None
