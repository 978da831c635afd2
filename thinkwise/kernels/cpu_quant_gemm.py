"""Quantized linear layers on x86 CPUs: our AVX-512 VNNI / AVX2 kernel, its packing and its PyTorch twin.

Weights are stored in blocks of 32 along the input dimension, llama.cpp-style: 8-bit codes
with one fp16 scale per block (W = s * q, q in -127..127; GGUF Q8_0 is exactly this), 5-bit
codes with one fp16 scale (W = s * q, q in -16..15: GGUF Q5_0) or 4-bit codes with an fp16
scale and an fp16 offset per block (W = s * c + o, c in 0..15; GGUF Q4_0 and Q4_1 exactly,
Q4_K up to the fp16 rounding of its two-level scales). At run time each row of activations
is quantized per block of 32 to int8 (scale amax / 127), so the dot products are integer
VNNI work; 16 weight rows are interleaved (`layout`) so each VNNI instruction feeds 16
outputs at once and no horizontal sums are needed, and the weights are read once per step
for up to 8 token rows: the kernel (csrc/cpu_quant_gemm.cpp) is memory-bound at 1 row and
stays close to it at 8, where PyTorch's int8 x bf16 kernel is compute-bound. CPUs without
AVX-512 VNNI (most laptops, AMD before Zen 4) run the AVX2 build of the same source: the same
layout and results, vpmaddubsw / vpmaddwd in place of vpdpbusd, 4- and 5-bit codes decoded
once per pass of 8 token rows. The
best build the CPU runs is compiled on first use with the system's C++ compiler
(kernels/cpu_build.py); `status()` says which ("isa") or, if none, why (no compiler, neither
instruction set, a failed build), and the linear methods then fall back to PyTorch's own
int8/int4 CPU kernels and say so in the run metadata.
Between two calls the helper threads, otherwise spinning, prefetch the weights of the layers
that followed the current one last time (a decode step calls its layers in one order), up to 4
MiB ahead, so calls start on weights already in cache or on their way from DRAM: the gaps
between a batch-1 step's matmuls (attention, norms, Python; ~4 ms a token on the default model)
otherwise leave the memory bus idle. `EngineConfig.cpu_weight_prefetch_mib` (or
THINKWISE_CPU_WEIGHT_PREFETCH) sets the MiB ahead, 0 off; the run metadata's "cpu_kernel" says
which; results are the same bits either way.
`reference_linear` is the twin every call of `quant_linear` is tested against: dequantize
W, quantize-dequantize x the same way, one float32 `F.linear`.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import cpu_build

BLOCK = 32  # weights per scale
DISABLE_ENV = "THINKWISE_CPU_QUANT_KERNEL"  # "0": PyTorch's kernels; "avx2": that build even where AVX-512 runs
DEFAULT_PREFETCH_MIB = 4.0  # EngineConfig.cpu_weight_prefetch_mib's default
MAX_PREFETCH_MIB = 65536  # the range EngineConfig, its variable and `set_weight_prefetch` accept: [0, this]

# Both builds register the same operator under their own namespace, so one process may load both (tests).
_library = cpu_build.LibraryVariants([
    ("avx512_vnni", "thinkwise_cpu", cpu_build.CppLibrary(
        "cpu_quant_gemm", cpu_build.CSRC / "cpu_quant_gemm.cpp",
        ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-pthread"],
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"))),
    ("avx2", "thinkwise_cpu_avx2", cpu_build.CppLibrary(
        "cpu_quant_gemm_avx2", cpu_build.CSRC / "cpu_quant_gemm.cpp",
        ["-O3", "-mavx2", "-mfma", "-mf16c", "-DTHINKWISE_AVX2", "-pthread"], ("avx2", "f16c", "fma"))),
], DISABLE_ENV)
status = _library.status  # {"available", "reason" (the build directory, or why not), "isa", "namespace"}
available = _library.available
_load = _library.load
_op = None  # torch.ops.thinkwise_cpu.quant_linear once loaded
_prefetch_mib = DEFAULT_PREFETCH_MIB


BITS = (4, 5, 8)
LANES = 16  # weight rows interleaved per tile
BLOCK_BYTES = {8: 512, 5: 320, 4: 256}  # code bytes per tile of 16 rows and block of 32 inputs
FILLER = {8: 128, 5: 16, 4: 0}  # the zero weight's code, for padding rows


def _quantize_symmetric(weight: torch.Tensor, top: float, low: int, high: int, offset: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 = q + offset, scales [N, K/32] fp16): per block s = amax / top
    (rounded to fp16), q = round(w / s) clamped to low..high; K a multiple of 32."""
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float16)
    for start in range(0, n, 8192):  # bounded fp32 temporaries (lm_head)
        rows = slice(start, start + 8192)
        w = weight[rows].to(torch.float32, copy=True).reshape(-1, k // BLOCK, BLOCK)
        s = (w.abs().amax(dim=-1) / top).clamp(max=65504.0).to(torch.float16)
        inverse = torch.where(s > 0, 1.0 / s.float(), torch.zeros((), dtype=torch.float32))
        codes[rows] = w.mul_(inverse[..., None]).round_().clamp_(low, high).add_(offset).reshape(-1, k).to(torch.uint8)
        scales[rows] = s
    return codes, scales


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 = q + 128, scales [N, K/32] fp16) for a float weight [N, K], K a
    multiple of 32: per block s = amax / 127 (rounded to fp16), q = round(w / s)."""
    return _quantize_symmetric(weight, 127.0, -127, 127, 128)


def quantize_int5(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 = q + 16, scales [N, K/32] fp16): per block s = amax / 15 (fp16),
    q = round(w / s) in -16..15 (GGUF Q5_0's grid, used symmetrically)."""
    return _quantize_symmetric(weight, 15.0, -16, 15, 16)


def quantize_int4(weight: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] uint8 in 0..15, scales, offsets [N, K/32] fp16): per group s = (max - min)
    / 15 and o = min (both rounded to fp16), c = round((w - o) / s); a group wider than 32
    (64, 128) repeats its (s, o) in each of its blocks."""
    n, k = weight.shape
    if group % BLOCK or k % group:
        raise ValueError(f"quantize_int4: group {group} must be a multiple of {BLOCK} dividing K={k}")
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float16)
    offsets = torch.empty_like(scales)
    for start in range(0, n, 8192):
        rows = slice(start, start + 8192)
        w = weight[rows].to(torch.float32, copy=True).reshape(-1, k // group, group)
        low, high = torch.aminmax(w, dim=-1)
        s = ((high - low) / 15.0).clamp(max=65504.0).to(torch.float16)
        o = low.to(torch.float16)
        inverse = torch.where(s > 0, 1.0 / s.float(), torch.zeros((), dtype=torch.float32))
        c = w.sub_(o.float()[..., None]).mul_(inverse[..., None]).round_().clamp_(0, 15)
        codes[rows] = c.reshape(-1, k).to(torch.uint8)
        scales[rows] = s.repeat_interleave(group // BLOCK, dim=1)
        offsets[rows] = o.repeat_interleave(group // BLOCK, dim=1)
    return codes, scales, offsets


def layout(bits: int, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, ...]:
    """Codes [N, K] (0..2^bits-1, row-major) and per-block scales/offsets [N, K/32] -> the
    kernel's interleaved tensors (see csrc/cpu_quant_gemm.cpp): codes [tiles, K/32 * bytes],
    scales (and 4-bit offsets) [tiles, K/32 * 16] fp16, rows padded to 16."""
    n, k = codes.shape
    tiles, blocks = -(-n // LANES), k // BLOCK
    pad = tiles * LANES - n
    if pad:
        codes = torch.cat([codes, codes.new_full((pad, k), FILLER[bits])])
        scales = torch.cat([scales, scales.new_zeros(pad, blocks)])
        offsets = None if offsets is None else torch.cat([offsets, offsets.new_zeros(pad, blocks)])

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [N, blocks] -> [tiles, blocks * 16]
        return t.to(torch.float16).reshape(tiles, LANES, blocks).transpose(1, 2).reshape(tiles, -1).contiguous()

    # [tile, lane, block, step, q] with input = 4 * step + q inside the block
    steps = codes.reshape(tiles, LANES, blocks, 8, 4)
    if bits == 8:
        return steps.permute(0, 2, 3, 1, 4).reshape(tiles, -1).contiguous(), per_block(scales)
    low = steps & 0x0F
    nibbles = (low[:, :, :, :4] | (low[:, :, :, 4:] << 4)).permute(0, 2, 3, 1, 4)  # [tile, block, t, lane, q]
    if bits == 4:
        return nibbles.reshape(tiles, -1).contiguous(), per_block(scales), per_block(offsets)
    # the fifth bits as 64 bit planes: byte 4 lane + q, bit step
    fifth = ((steps >> 4) & 1).permute(0, 2, 1, 4, 3).reshape(tiles, blocks, 64, 8)
    planes = (fifth * torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    packed = torch.cat([nibbles.reshape(tiles, blocks, 256), planes], dim=-1)
    return packed.reshape(tiles, -1).contiguous(), per_block(scales)


def unlayout(bits: int, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, out_features: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of `layout`: (codes [N, K], scales [N, K/32], offsets or None)."""
    tiles = codes.shape[0]
    blocks = scales.shape[1] // LANES

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(tiles, blocks, LANES).transpose(1, 2).reshape(tiles * LANES, blocks)[:out_features]

    data = codes.reshape(tiles, blocks, BLOCK_BYTES[bits])
    if bits == 8:
        steps = data.reshape(tiles, blocks, 8, LANES, 4)
    else:
        nibbles = data[..., :256].reshape(tiles, blocks, 4, LANES, 4)
        steps = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=2)  # [tile, block, step, lane, q]
        if bits == 5:
            planes = data[..., 256:].reshape(tiles, blocks, LANES, 4, 1)
            fifth = (planes >> torch.arange(8, dtype=torch.uint8)) & 1  # [tile, block, lane, q, step]
            steps = steps | (fifth.permute(0, 1, 4, 2, 3) << 4)
    values = steps.permute(0, 3, 1, 2, 4).reshape(tiles * LANES, blocks * BLOCK)[:out_features]
    return values, per_row(scales), None if offsets is None else per_row(offsets)


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` in the kernel's layout: (codes, scales)."""
    return layout(8, *quantize_int8(weight))


def pack_int5(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int5` in the kernel's layout: (codes, scales)."""
    return layout(5, *quantize_int5(weight))


def pack_int4(weight: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_int4` in the kernel's layout: (codes, scales, offsets)."""
    return layout(4, *quantize_int4(weight, group))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, in_features: int,
               out_features: int, bits: int) -> torch.Tensor:
    """The float32 weight [N, K] the stored form stands for."""
    values, s, o = unlayout(bits, codes, scales, offsets, out_features)
    blocks = values.reshape(out_features, -1, BLOCK).float()
    if bits == 4:
        w = blocks * s.float()[..., None] + o.float()[..., None]
    else:
        w = (blocks - FILLER[bits]) * s.float()[..., None]
    return w.reshape(out_features, in_features)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel sees it: per row and block of 32, round(x / s) * s with
    s = amax / 127, in float32 (the same operations, so the same codes)."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros((), dtype=torch.float32))
    q = (blocks * inverse[..., None]).round().clamp(-127, 127)
    return (q * scale[..., None]).reshape(x.shape)


def reference_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                     bias: torch.Tensor | None, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """The PyTorch twin of `quant_linear` (same signature): dequantize, quantize x, F.linear."""
    w = dequantize(codes, scales, offsets, in_features, out_features, bits)
    out = torch.nn.functional.linear(quantize_activations(x), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def set_weight_prefetch(mib: float) -> None:
    """How many MiB of the next layers' weights the kernel's idle helper threads prefetch
    between calls (0: off); the engine sets it from `EngineConfig.cpu_weight_prefetch_mib`."""
    global _prefetch_mib
    if not 0 <= mib <= MAX_PREFETCH_MIB:
        raise ValueError(f"the CPU weight prefetch takes 0 (off) to {MAX_PREFETCH_MIB} MiB, not {mib!r}")
    _prefetch_mib = float(mib)
    if _op is not None:
        getattr(torch.ops, status()["namespace"]).set_weight_prefetch(int(_prefetch_mib * 1024 * 1024))


def weight_prefetch_mib() -> float:
    return _prefetch_mib


def quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp32, contiguous) times the stored weight, + bias: [M, N] in x's dtype.
    Only after `status()` reported the kernel available."""
    global _op
    if _op is None:
        if not available():
            raise RuntimeError(f"the CPU quantized-GEMM kernel is not available: {status()['reason']}")
        operators = getattr(torch.ops, status()["namespace"])
        operators.set_weight_prefetch(int(_prefetch_mib * 1024 * 1024))
        _op = operators.quant_linear.default
    return _op(x, codes, scales, offsets, bias, in_features, out_features, bits)
