"""int8 weight-only, one scale per output channel, round-to-nearest (no calibration).

w ~= q * s with s = max|w_row| / 127 and q = round(w / s) in [-127, 127]: half the bytes of
bf16 and, measured on the default 0.5B model, perplexity within a fraction of a percent
(benchmarks/quant_quality.py). The scale is computed from the *stored* (rounded to the
compute dtype) scale so codes and scale agree exactly. On an x86 CPU with AVX-512 VNNI or
AVX2 (and a C++ compiler for the first use) the weight is instead stored in blocks of 32 with an fp16
scale each (llama.cpp's Q8_0, finer than per channel) and multiplied by our kernel
(`cpu_quant_gemm`: int8 activations, integer dot products), memory-bound at 1 to 8 rows;
elsewhere the CPU runs PyTorch's `_weight_int8pack_mm` (the int8 x bf16 kernel gpt-fast's
int8 path uses on CPU). CUDA runs the Triton kernel of `triton_quant_gemm` where the
dispatch table picks it, else dequantize-then-cuBLAS.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import cpu_quant_gemm
from thinkwise.kernels.linear_methods.base import LinearMethod
from thinkwise.kernels.linear_methods.cpu_blocks import BlockedOnCpu
from thinkwise.kernels.linear_methods.plans import gpu_apply, gpu_apply_silu_mul, quant_candidates, split_k_need

ROWS_PER_CHUNK = 8192


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8, scales [N] in `scale_dtype`) for a float weight [N, K]."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):  # bounded fp32 temporaries (lm_head)
        w = weight[start:start + ROWS_PER_CHUNK].to(torch.float32, copy=True)
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10).to(scale_dtype)
        codes[start:start + ROWS_PER_CHUNK] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127)
        scales[start:start + ROWS_PER_CHUNK] = s
    return codes, scales


class Int8Method(BlockedOnCpu, LinearMethod):
    name = "int8"
    bits = 8  # cpu_quant_gemm's code width when blocked

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the activations' dtype: the scales are stored in it

    def quantize(self, layer, weight: torch.Tensor) -> None:
        if weight.device.type == "cpu" and weight.shape[1] % cpu_quant_gemm.BLOCK == 0 and cpu_quant_gemm.available():
            codes, scales = cpu_quant_gemm.pack_int8(weight)
            self.keep_blocks(layer, codes, scales)
            return
        codes, scales = quantize_int8(weight, self.dtype)
        del layer.weight
        layer.weight = None
        layer.register_buffer("qweight", codes.contiguous())
        layer.register_buffer("scales", scales.contiguous())

    def dequantize(self, layer) -> torch.Tensor:
        if self.blocked:
            return self.blocked_dequantize(layer)
        return layer.qweight.float() * layer.scales.float()[:, None]

    def dequantize_to(self, layer, dtype: torch.dtype) -> torch.Tensor:
        if not self.blocked and layer.qweight.is_cuda:  # one Triton pass, no float32 copy
            from thinkwise.kernels.triton_quant_gemm import dequantize

            return dequantize(layer.qweight, layer.scales, None, layer.in_features, dtype)
        return super().dequantize_to(layer, dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            return self.blocked_apply(layer, x)
        if x.device.type == "cuda":
            return gpu_apply(self, layer, x, layer.qweight, layer.scales, None, layer.in_features)
        lead = x.shape[:-1]
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, layer.in_features), layer.qweight,
                                                 layer.scales.to(x.dtype))
        if layer.bias is not None:
            out = out + layer.bias
        return out.reshape(*lead, layer.out_features)

    def storage_bytes(self, layer) -> int:
        if self.blocked:
            return self.blocked_storage_bytes(layer)
        return layer.qweight.numel() + layer.scales.numel() * layer.scales.element_size()

    def apply_silu_mul(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        if self.blocked or x.device.type != "cuda":
            return None
        return gpu_apply_silu_mul(layer, x, layer.qweight, layer.scales, None, layer.in_features)

    def split_k_need(self, layer) -> tuple[int, int]:
        if self.blocked or not hasattr(layer, "qweight"):
            return 0, 0
        return split_k_need(layer, layer.qweight, None, layer.in_features)

    def gpu_candidates(self, layer, rows: int):
        return quant_candidates(layer, rows, layer.qweight, layer.scales, None, layer.in_features)
