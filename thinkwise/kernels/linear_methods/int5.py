"""5-bit weights in blocks of 32 (GGUF Q5_0), kept as the file stores them, CPU kernel only.

Most projections of the default model's Q4_K_M file are Q5_0 (d * (q - 16), q in 0..31, an
fp16 d per block of 32): 5.5 bits per weight. Requantizing them to int8 reads 55% more
bytes per token than llama.cpp does for the same file, so under quantization="gguf" such a
layer keeps the file's own codes in `cpu_quant_gemm`'s 5-bit layout, losslessly, and our
CPU kernel multiplies it. The method exists only there: without the kernel (neither AVX-512
VNNI nor AVX2, or no compiler) or off the CPU, `unsupported` says so and the layer falls back to int8.
`pack_int5` (round to nearest, symmetric) serves weights that do not come from a Q5_0 tensor.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import cpu_quant_gemm
from thinkwise.kernels.linear_methods.base import LinearMethod
from thinkwise.kernels.linear_methods.cpu_blocks import BlockedOnCpu


class Int5Method(BlockedOnCpu, LinearMethod):
    name = "int5"
    bits = 5

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.blocked = True

    def describe(self) -> str:
        return "int5-g32"

    def unsupported(self, layer) -> str | None:
        if layer.weight is None or layer.weight.device.type != "cpu":
            return "5-bit blocks have a kernel on the CPU only"
        if layer.in_features % cpu_quant_gemm.BLOCK:
            return f"its {layer.in_features} inputs are not a multiple of {cpu_quant_gemm.BLOCK}"
        if not cpu_quant_gemm.available():
            return f"the CPU kernel is unavailable ({cpu_quant_gemm.status()['reason']})"
        return None

    def quantize(self, layer, weight: torch.Tensor) -> None:
        self.keep_blocks(layer, *cpu_quant_gemm.pack_int5(weight))

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.blocked_apply(layer, x)

    def dequantize(self, layer) -> torch.Tensor:
        return self.blocked_dequantize(layer)

    def storage_bytes(self, layer) -> int:
        return self.blocked_storage_bytes(layer)
