"""The contract between a linear layer and the way its weight is stored and multiplied.

A `LinearMethod` owns one question: given the 16-bit weight a `DispatchLinear` was loaded
with, what does the layer keep in memory, and how is `x @ W.T + b` computed from it. Methods
are chosen per layer after the weights are loaded (`linear_methods.quantize_model`); the
model code calls `layer(x)` as before and never learns which method runs, in the spirit of
gpt-fast's `WeightOnlyInt8Linear`. A method keeps its tensors as buffers on the layer (so
`.to(device)` moves them and CUDA graphs capture them like any other tensor), deletes the
16-bit weight, and offers `reference` (dequantize, then `F.linear`: the twin every kernel is
tested against) besides `apply` (the fast path on this device). `storage_bytes` is what the
cost model charges for reading the layer; `gpu_candidates` lets the GPU dispatch table time
the method's kernels against dequantize-then-cuBLAS per shape and row count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from thinkwise.kernels.linear_dispatch import DispatchLinear


class LinearMethod:
    """One way to store and multiply a linear layer's weight (see the module docstring)."""

    name: ClassVar[str]  # the registry key, e.g. "int8"

    def describe(self) -> str:
        """The label run metadata shows for layers using this method (e.g. "int4-g32")."""
        return self.name

    def unsupported(self, layer: DispatchLinear) -> str | None:
        """Why this method cannot hold `layer` (a shape it cannot tile), or None if it can."""
        return None

    def quantize(self, layer: DispatchLinear, weight: torch.Tensor) -> None:
        """Replace the layer's 16-bit `weight` by this method's buffers, computed from `weight`."""
        raise NotImplementedError

    def apply(self, layer: DispatchLinear, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + bias` with this device's fastest kernel for the layer."""
        raise NotImplementedError

    def dequantize(self, layer: DispatchLinear) -> torch.Tensor:
        """The weight W [out, in] the stored form stands for, in float32."""
        raise NotImplementedError

    def dequantize_to(self, layer: DispatchLinear, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize(layer).to(dtype)`; a method may make it without the float32 copy (on CUDA,
        the dequantize-then-cuBLAS path the dispatch table times against its Triton kernels)."""
        return self.dequantize(layer).to(dtype)

    def apply_silu_mul(self, layer: DispatchLinear, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU(gate) * up of `apply(layer, x)` for a fused [gate; up] layer, in one kernel where
        this device's kernel has that epilogue; None: the caller applies, then runs the
        element-wise kernel. Must equal the unfused result bit for bit."""
        return None

    def reference(self, layer: DispatchLinear, x: torch.Tensor) -> torch.Tensor:
        """The PyTorch twin of `apply`: dequantize, then an ordinary linear in x's dtype."""
        bias = layer.bias
        return torch.nn.functional.linear(x, self.dequantize_to(layer, x.dtype), bias)

    def storage_bytes(self, layer: DispatchLinear) -> int:
        """Bytes a matmul reads for this layer's weight (codes, scales, zero points)."""
        raise NotImplementedError

    def split_k_need(self, layer: DispatchLinear) -> tuple[int, int]:
        """(partial floats, counters) of the largest split-K call the layer's installed plan makes
        (the dispatcher gives all layers one `triton_gemm.SplitKWorkspace` that fits); (0, 0): none."""
        return 0, 0

    def gpu_candidates(self, layer: DispatchLinear, rows: int) -> dict[str, tuple[object, Callable]]:
        """name -> (tiling, call x -> y): the Triton implementations the GPU dispatcher may
        time for `rows` rows; dequantize-then-cuBLAS (`reference`) is always the baseline."""
        return {}
