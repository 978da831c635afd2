"""GGUF block bytes -> `cpu_quant_gemm`'s layouts, without a detour through 16-bit weights.

Under quantization="gguf" on the CPU kernel, a layer keeps the file's own bits where the
kernel has the same grid: Q8_0 -> 8-bit blocks (codes and fp16 scales copied), Q5_0 -> 5-bit
blocks (copied), Q4_0 / Q4_1 -> 4-bit blocks with scale and offset (copied; Q4_0's offset
is -8 d, exact in fp16), Q4_K -> 4-bit blocks with s = d * sc and o = -dmin * m (the two-level
scales multiplied out and rounded to fp16, ~2^-11 relative). Any other type (Q6_K, Q5_1,
Q5_K, IQ*, ...) and any part whose grid differs from the layer's (a fused q/k/v of Q5_0 and
Q8_0 is 8-bit: Q5_0 codes move to the 8-bit grid exactly) goes through `gguf`'s float32
dequantization and our round-to-nearest packer. Rows are put in the order the
architecture's loader gives them (`row_order`: llama.cpp interleaves Llama's q/k rows).
"""

from __future__ import annotations

import numpy as np
import torch

from thinkwise.kernels import cpu_quant_gemm as qg

BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
NATIVE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4}


def _half(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: the low nibbles are values 0..15, the high ones 16..31 (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def native_values(type_name: str, raw: np.ndarray, rows: int, cols: int
                  ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """(bits, codes [rows, cols] uint8 on the kernel's grid, scales [rows, cols/32] fp32,
    offsets or None) of one GGUF tensor of a type in NATIVE_BITS."""
    if type_name == "Q4_K":
        blocks = raw.reshape(rows, cols // 256, 144)
        d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
        sc_bytes = blocks[..., 4:16].astype(np.uint8)
        qs = blocks[..., 16:144].reshape(rows, cols // 256, 4, 32)
        # Each 32 bytes hold two sub-blocks: low nibbles the first 32 weights, high the next.
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
        low = sc_bytes[..., :4]
        mid = sc_bytes[..., 4:8]
        high = sc_bytes[..., 8:12]
        sc = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=-1).astype(np.float32)
        mins = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1).astype(np.float32)
        scales = (d[..., None] * sc).reshape(rows, cols // 32)
        offsets = (-(dmin[..., None] * mins)).reshape(rows, cols // 32)
        return 4, codes, scales, offsets
    blocks = raw.reshape(rows, cols // 32, BLOCK_BYTES[type_name])
    d = _half(blocks[..., 0:2])
    if type_name == "Q8_0":
        q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).astype(np.int16) + 128
        return 8, q.astype(np.uint8).reshape(rows, cols), d, None
    if type_name == "Q5_0":
        qh = np.ascontiguousarray(blocks[..., 2:6]).view(np.uint32)[..., 0]
        fifth = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _low_high(blocks[..., 6:22]) | (fifth << 4)
        return 5, codes.reshape(rows, cols), d, None
    if type_name == "Q4_0":
        return 4, _low_high(blocks[..., 2:18]).reshape(rows, cols), d, -8.0 * d
    if type_name == "Q4_1":
        return 4, _low_high(blocks[..., 4:20]).reshape(rows, cols), d, _half(blocks[..., 2:4])
    raise KeyError(type_name)


def natural(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> tuple[torch.Tensor, ...]:
    """Native values as torch tensors: (codes [rows, cols] uint8, scales [rows, cols/32] fp16[, offsets])."""
    out = [torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)),
           torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).to(torch.float16)]
    if offsets is not None:
        out.append(torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32)).to(torch.float16))
    return tuple(out)


def part_values(type_name: str, raw: np.ndarray, rows: int, cols: int, bits: int, row_order,
                dequantized) -> tuple[tuple[torch.Tensor, ...], bool]:
    """One GGUF tensor on the layer's `bits` grid, row-major (`cpu_quant_gemm.layout`'s input):
    (tensors, whether the file's bits were kept). `row_order`: None (the file's order), an
    index array, or False (the loader does more than reorder rows: use the fallback);
    `dequantized()` gives the float32 [rows, cols] weight as the loader sees it, for the fallback."""
    if type_name in NATIVE_BITS and row_order is not False:
        native, codes, scales, offsets = native_values(type_name, raw, rows, cols)
        if native == 5 and bits == 8:  # same scale, q - 16 on the 8-bit grid: exact
            native, codes = 8, codes.astype(np.int16) - 16 + 128
        if native == bits:
            if isinstance(row_order, np.ndarray):
                codes, scales = codes[row_order], scales[row_order]
                offsets = None if offsets is None else offsets[row_order]
            return natural(codes, scales, offsets), True
    weight = dequantized()
    quantizer = {8: qg.quantize_int8, 5: qg.quantize_int5, 4: qg.quantize_int4}[bits]
    return quantizer(weight), False
