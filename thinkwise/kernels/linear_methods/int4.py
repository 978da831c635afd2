"""int4 weight-only, group-wise asymmetric, round-to-nearest (no calibration).

Each output row is cut into groups of `group` inputs (32, 64 or 128); a group stores a
scale s and a zero point z (in the activations' dtype) and its weights as 4-bit codes,
w ~= (code - 8) * s + z, the convention of gpt-fast and of PyTorch's int4 kernels. The
default group is 32: it is what llama.cpp's 4-bit blocks use, and on a 0.5B model (small
rows, outlier-heavy) 128-wide groups lose visibly more perplexity for 0.75 bit less per
weight (benchmarks/quant_quality.py measures both). K must be a multiple of the group.
On an x86 CPU with AVX-512 VNNI or AVX2 (and a C++ compiler for the first use) the codes are kept in
`cpu_quant_gemm`'s layout (fp16 scale and offset per block of 32; a 64- or 128-wide group's
pair repeated per block) and multiplied by our kernel; elsewhere the CPU runs PyTorch's
`_weight_int4pack_mm_for_cpu` on weights repacked by
`_convert_weight_to_int4pack_for_cpu` (rows padded to its multiple of 16, the padding
sliced off the result). CUDA keeps two codes per byte for the Triton kernel of
`triton_quant_gemm`.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import cpu_quant_gemm
from thinkwise.kernels.linear_methods.base import LinearMethod
from thinkwise.kernels.linear_methods.cpu_blocks import BlockedOnCpu
from thinkwise.kernels.linear_methods.plans import gpu_apply, gpu_apply_silu_mul, quant_candidates, split_k_need

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 32
CPU_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu wants N % 16 == 0
CPU_INNER_K_TILES = 2
ROWS_PER_CHUNK = 8192


def quantize_int4(weight: torch.Tensor, group: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 in 0..15, scales [N, K/group], zeros [N, K/group]) for a float
    weight [N, K]. The zero point is derived from the stored (rounded) scale and the codes
    from both stored values, so dequantizing reproduces the rounding error only once."""
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group, dtype=scale_dtype, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, n, ROWS_PER_CHUNK):  # bounded fp32 temporaries (lm_head)
        rows = slice(start, start + ROWS_PER_CHUNK)
        w = weight[rows].to(torch.float32, copy=True).reshape(-1, k // group, group)
        low, high = torch.aminmax(w, dim=-1)
        s = ((high - low) / 15.0).clamp(min=1e-10).to(scale_dtype)
        z = (low + 8.0 * s.float()).to(scale_dtype)
        # In place, one fp32 temporary: (w - z) / s + 8, rounded and clamped to 0..15.
        w.sub_(z.float()[..., None]).div_(s.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
        codes[rows], scales[rows], zeros[rows] = w.reshape(-1, k), s, z
    return codes, scales, zeros


class Int4Method(BlockedOnCpu, LinearMethod):
    name = "int4"
    bits = 4  # cpu_quant_gemm's code width when blocked

    def __init__(self, dtype: torch.dtype, group: int = DEFAULT_GROUP):
        self.dtype = dtype
        self.group = group

    def describe(self) -> str:
        return f"int4-g{self.group}"

    def unsupported(self, layer) -> str | None:
        if layer.in_features % self.group:
            return f"its {layer.in_features} inputs are not a multiple of the group size {self.group}"
        return None

    def quantize(self, layer, weight: torch.Tensor) -> None:
        if weight.device.type == "cpu" and cpu_quant_gemm.available():
            self.keep_blocks(layer, *cpu_quant_gemm.pack_int4(weight, self.group))
            return
        codes, scales, zeros = quantize_int4(weight, self.group, self.dtype)
        del layer.weight
        layer.weight = None
        if weight.device.type == "cuda":
            from thinkwise.kernels.triton_quant_gemm import pack_int4

            layer.register_buffer("qweight", pack_int4(codes).contiguous())
            layer.register_buffer("scales", scales.contiguous())
            layer.register_buffer("zeros", zeros.contiguous())
            return
        pad = -layer.out_features % CPU_ROW_MULTIPLE
        codes = codes.to(torch.int32)
        if pad:  # zero rows (code 8, scale 0, zero 0): computed, then sliced off
            codes = torch.cat([codes, torch.full((pad, codes.shape[1]), 8, dtype=torch.int32)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        layer.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, CPU_INNER_K_TILES))
        # The CPU kernel takes [K/group, N, 2] (scale, zero).
        layer.register_buffer("scales_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).contiguous())

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            return self.blocked_apply(layer, x)
        if x.device.type == "cuda":
            return gpu_apply(self, layer, x, layer.qweight, layer.scales, layer.zeros, self.group)
        lead = x.shape[:-1]
        scales_zeros = layer.scales_zeros
        if scales_zeros.dtype != x.dtype:
            scales_zeros = scales_zeros.to(x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, layer.in_features), layer.packed,
                                                         self.group, scales_zeros)
        if out.shape[-1] != layer.out_features:
            out = out[:, : layer.out_features]
        if layer.bias is not None:
            out = out + layer.bias
        return out.reshape(*lead, layer.out_features)

    def dequantize_to(self, layer, dtype: torch.dtype) -> torch.Tensor:
        if not self.blocked and hasattr(layer, "qweight") and layer.qweight.is_cuda:  # one Triton pass
            from thinkwise.kernels.triton_quant_gemm import dequantize

            return dequantize(layer.qweight, layer.scales, layer.zeros, self.group, dtype)
        return super().dequantize_to(layer, dtype)

    def dequantize(self, layer) -> torch.Tensor:
        if self.blocked:
            return self.blocked_dequantize(layer)
        if hasattr(layer, "qweight"):
            from thinkwise.kernels.triton_quant_gemm import dequantize_reference

            return dequantize_reference(layer.qweight, layer.scales, layer.zeros, self.group)
        # The CPU packing is opaque; the kernel applied to the identity reads the weight back.
        eye = torch.eye(layer.in_features, dtype=layer.scales_zeros.dtype)
        columns = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, self.group, layer.scales_zeros)
        return columns[:, : layer.out_features].t().float()

    def storage_bytes(self, layer) -> int:
        if self.blocked:
            return self.blocked_storage_bytes(layer)
        if hasattr(layer, "qweight"):
            return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))
        return layer.packed.numel() * layer.packed.element_size() + \
            layer.scales_zeros.numel() * layer.scales_zeros.element_size()

    def apply_silu_mul(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        if self.blocked or x.device.type != "cuda":
            return None
        return gpu_apply_silu_mul(layer, x, layer.qweight, layer.scales, layer.zeros, self.group)

    def split_k_need(self, layer) -> tuple[int, int]:
        if self.blocked or not hasattr(layer, "qweight"):
            return 0, 0
        return split_k_need(layer, layer.qweight, layer.zeros, self.group)

    def gpu_candidates(self, layer, rows: int):
        return quant_candidates(layer, rows, layer.qweight, layer.scales, layer.zeros, self.group)
