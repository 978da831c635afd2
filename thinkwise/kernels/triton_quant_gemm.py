"""Weight-only int8 / int4 GEMV and flat GEMM in Triton, dequantizing inside the kernel.

Decode reads every weight once per step, so storing W in 8 or 4 bits instead of 16 cuts
the bytes a step moves by 2x or ~3.5x, and the time with it, as long as the kernel streams
the codes straight from HBM and dequantizes in registers (never writing a 16-bit copy).
Layouts: int8 is `q` [N, K] int8 with one scale per output row (w = q * s, the scale
applied once to the finished dot product); int4 is `q` [N, K/2] uint8, two codes per byte
(low nibble = even k), with a scale and a zero point per row and group of `group` inputs
(w = (code - 8) * s + z, gpt-fast's and PyTorch's int4 convention).

Two kernels. The GEMV (1..4 token rows, one row per program) reads the codes as int32
words and treats code j of every word as a plane of its own (the sum over k does not care
about the order), so each thread decodes the words it loaded without reshapes or
cross-thread traffic; a code becomes an exact float32 by OR-ing it into the mantissa of
2^23 and subtracting, instead of an int-to-float conversion (a quarter of the FMA rate,
which bounded the first version at ~1.3 TB/s); products accumulate element-wise and are
reduced once. The flat GEMM (any M, padded to 16) loads the code bytes as stored and casts
them into `tl.dot` (int4: the low- and high-nibble planes dequantized, then joined back into
k order for one dot on a plain x tile), so Triton's pipeliner stages the weight and x loads
like a 16-bit GEMM's (asynchronous copies on sm_90; the older form, a dot per nibble plane
against the even and the odd inputs, read x with strided 16-bit loads that nothing staged:
~9.8 SASS instructions a weight against ~7.0, and 1.3-3.5x slower on an H100). Its
`bf16_pairs` tiles (int4, bf16 x) load the codes as int32 words instead and dequantize two
an instruction in bf16 pairs by PTX (`INT4_WORD_TO_BF16`: ~1.9 instructions a weight for the
decode, ~6.0 a weight for the whole loop against ~7.0); they join the start-up table as `_p2`
tilings, not yet timed on a GPU. A split-K variant gives long-K, small-N shapes enough
programs; the last program of a tile to arrive sums its slices in a fixed order
(deterministic, unlike atomics), adds the bias and stores, as the 16-bit flat GEMM does
(`triton_gemm.finish_tile`, through the one `SplitKWorkspace` the dispatcher gives all
layers). The 64-row int4 tiles, read in their sm_90 SASS (Triton 3.6, compiled without a GPU):
in `_quant_gemm_kernel` the dequantized weights are wgmma's register A operand, in whose layout a
thread holds k pairs 8 apart, so the codes leave shared memory a byte a load (32 LDS.U8 a thread
for a 64 x 128 tile); ptxas serializes the tile's eight 64x64x16 HGMMAs (a wait after each: the
next one's A registers are the same); and the 2-byte group scale and zero loads, which the
pipeliner cannot stage (cp.async moves 4 to 16 bytes), are issued and waited on inside each
step. The `weight_b` tiles (`_quant_gemm_wb_kernel`) compute x @ W^T instead: x, staged by the
pipeliner, is the A operand; the weights are decoded in their load's layout and stored once into
shared memory as the B operand (8 STS.128 a thread for 64 x 128); the HGMMAs issue back to back
with one wait; the scales and zeros are loaded a step ahead (`decode_ahead` tilings: the codes
too, into registers, and the next tile is decoded after this one's dot is issued). A 64 x 128
weight tile's loop: 469 instructions and eight serialized HGMMAs (magic decode) against 305
(`weight_b`, bf16 pairs; 128 x 128: 461, 3.6 a weight; `decode_ahead` 444). More programs an SM
did not help: K tiles of 64 inside a group of 128 (12-24 warps an SM instead of 8) were slower on
every Llama-3-8B shape at 64 rows (gate/up 74.1 against 64.8 us, H100), so the tiles are bound
by each program's serial chain (load, decode, store, fence, wgmma, wait), not by occupancy.
Under PDL (`pdl`) the GEMV loads its first weight tile(s) before waiting for the previous kernel.
For a [gate; up] projection every tiling can end in the 16-bit GEMM's SiLU * up epilogue
(`triton_gemm.store_tile`; a tile reads matching gate and up rows), saving the element-wise
launch after each MLP's GEMM. The twin is `quant_gemm_reference`
(dequantize, then `F.linear`); the dispatch table in `linear_dispatch` times these tilings
against dequantize-then-cuBLAS per shape and M.

Measured on an H100 (`benchmarks/gpu_quant_gemm.py --sweep wide`, best tiling per shape,
`benchmarks/results/gpu_quant_gemm_h100.json`): int8 at one row 1.86-2.17x bf16 cuBLAS on
the Llama-3-8B shapes (2.3-3.0 TB/s), at 64 rows 0.88-1.58x; int4 (group 128) at one row
only 1.11-1.54x (0.75-1.16 TB/s: its decode, ~7 instructions a weight, is bound by issue,
not bytes) and at 64 rows 0.54-0.90x. End to end on an H200 (`benchmarks/gpu_throughput.py
--quantization`, `benchmarks/results/gpu_throughput_quantization_h200.json`, same run as the
bf16 column): Llama-3-8B batch 1 int8 1.46x bf16, int4-all-g128 0.91x; batch 64 0.73x / 0.50x;
Qwen3-0.6B batch 1 int8 1.04x, int4 0.91x; on an H100, Llama-3-8B batch 1 int8 1.56x,
int4-all-g128 1.13x. The H200's 4.2 TB/s makes bf16 faster while the
int4 decode stays issue-bound, and the batch-64 tiles trail cuBLAS. Those int4 figures
predate two changes measured on an H100 (`benchmarks/results/gpu_quant_gemm_int4_*_h100.json`,
default tilings): at 1..4 rows `triton_int4_half2`'s GEMV (`half2` tilings: two codes decoded
per instruction in fp16 pairs, ~3.2 SASS instructions a weight instead of ~8) wins every
shape: Llama-3-8B int4-g128 at one row 2.16-3.60x bf16 cuBLAS (1.42-2.42 TB/s; the best plain
GEMV 2.0-2.8x slower in the same run), Qwen3-0.6B int4-g32 1.77-3.02x; the k-order dot tiles
at 64 rows 0.69-1.42x bf16 (0.47-0.96 TB/s; the per-plane form 1.3-3.5x slower in the same
run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from thinkwise.kernels import pdl
from thinkwise.kernels.device_info import use_asm
from thinkwise.kernels.triton_gemm import EPILOGUE_NONE, EPILOGUE_SILU_MUL, SplitKWorkspace, split_k_placeholders
from thinkwise.kernels.triton_int4_half2 import int4_gemv_half2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch twin runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None
if HAVE_TRITON:
    # The 16-bit flat GEMM's tile rows and store: its SiLU * up epilogue rounds where the unfused
    # kernels round, so fused here it gives the bits of this GEMM followed by `fused.silu_mul`.
    from thinkwise.kernels.triton_gemm import finish_tile, store_row, tile_rows

# Eight int4 codes (one int32 word, k order: the low nibble of byte 0 first) -> eight bf16
# weights (code - 8) * scale + zero ($0..$7, k order), for the `bf16_pairs` dot tiles. lop3 ORs two
# nibbles (bits 0-3 and 16-19 after a shift) into the mantissas of two bf16 128s, giving
# 128 + code exactly; one fma.bf16x2 (x 1 - 136, exact; sub.bf16x2 would need sm_90) leaves
# code - 8 and another the weight, rounded once. Two codes an instruction, against one for the
# fp32 decode. $9/$10: the word's group scale and zero (bf16). sm_80+.
INT4_WORD_TO_BF16 = """{
.reg .b32 s2, z2, one, m, t, p0, p1, p2, p3;
mov.b32 s2, {$9, $9};
mov.b32 z2, {$10, $10};
mov.b32 one, 0x3f803f80;
mov.b32 m, 0xc308c308;
lop3.b32 p0, $8, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $8, 4;
lop3.b32 p1, t, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $8, 8;
lop3.b32 p2, t, 0x000f000f, 0x43004300, 0xea;
shr.u32 t, $8, 12;
lop3.b32 p3, t, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 p0, p0, one, m;
fma.rn.bf16x2 p1, p1, one, m;
fma.rn.bf16x2 p2, p2, one, m;
fma.rn.bf16x2 p3, p3, one, m;
fma.rn.bf16x2 p0, p0, s2, z2;
fma.rn.bf16x2 p1, p1, s2, z2;
fma.rn.bf16x2 p2, p2, s2, z2;
fma.rn.bf16x2 p3, p3, s2, z2;
mov.b32 {$0, $4}, p0;
mov.b32 {$1, $5}, p1;
mov.b32 {$2, $6}, p2;
mov.b32 {$3, $7}, p3;
}"""
# The x dtypes the `bf16_pairs` dot tiles take: their weights are rounded to bf16, as a bf16 x's dot
# rounds them anyway (an fp32 x, LayerCast, keeps exact fp32 weights on the other tiles).
PAIRS_DTYPES = (torch.bfloat16,)
DOT_MIN_ROWS = 16  # tl.dot needs every dimension >= 16
GEMV_MAX_ROWS = 4
MIN_INT4_BLOCK_K = 32


@dataclass(frozen=True)
class QuantGemmConfig:
    """One tiling. For int4, `block_k` counts weights (a tile reads block_k / 2 bytes per row)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True
    max_rows: int = 64
    x_pairs: bool = False  # GEMV tiles, bf16 x: read x two values per 32-bit load
    x_quads: bool = False  # int8 GEMV tiles, bf16 x: x four values per 64-bit load, in the codes' layout
    word_sums: bool = False  # int4 GEMV tiles: scale and zero applied once per word of 8 codes
    magic_decode: bool = False  # dot tiles: codes to floats by the mantissa trick (as the GEMV), not a conversion
    split_k: int = 1  # dot tiles: K cut into this many slices, summed in a fixed order afterwards
    half2: bool = False  # int4 GEMV tiles, bf16 x: two codes per instruction in fp16 pairs (triton_int4_half2)
    bf16_pairs: bool = False  # int4 dot tiles, bf16 x: codes dequantized two an instruction in bf16 pairs (PTX)
    prefetch: int = 1  # plain and x-pair GEMV tiles: weight tiles loaded ahead (the first ones before PDL's wait)
    weight_b: bool = False  # dot tiles: x @ W^T with the dequantized weights as the B operand (_quant_gemm_wb_kernel)
    decode_ahead: bool = False  # weight_b int4 tiles: decode the next weight tile after issuing this one's dot

    @property
    def name(self) -> str:
        extra = (f"_sk{self.split_k}" if self.split_k > 1 else "") + ("_xp" if self.x_pairs else "") + \
            ("_xq" if self.x_quads else "") + ("_mg" if self.magic_decode else "") + \
            ("_ws" if self.word_sums else "") + \
            ("_h2" if self.half2 else "") + ("_p2" if self.bf16_pairs else "") + \
            (f"_pf{self.prefetch}" if self.prefetch != 1 else "") + ("_wb" if self.weight_b else "") + \
            ("_da" if self.decode_ahead else "")
        return f"{'dot' if self.use_dot else 'gemv'}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}{extra}"

    def block_m(self, rows: int) -> int:
        rows_pow2 = 1 << (max(rows, 1) - 1).bit_length()
        if self.use_dot:
            return min(max(DOT_MIN_ROWS, rows_pow2), 64)
        return min(rows_pow2, GEMV_MAX_ROWS)


# Offered to the start-up profile (each the best of some shape in `benchmarks/gpu_quant_gemm.py
# --sweep wide` on an H100): CUDA-core GEMVs for 1..4 rows (one token row per program; narrow
# tiles so small matrices still spread over all SMs, long ones so each thread keeps 16-byte
# loads in flight), tensor-core tiles for any M (int4 on large N wins with them even at one
# row: its decode is bound by instruction issue on the CUDA cores; the half2 GEMVs decode two
# codes an instruction, ~3 instructions a weight against ~8), split-K tiles for long-K,
# small-N shapes at batch sizes where 64-row tiles leave SMs idle, and wide tiles for
# prefill-sized M (compared there against dequantize + cuBLAS). The four `bf16_pairs` tilings
# (int4 only) copy the int4 winners' shapes and have not been timed on a GPU yet: the table
# keeps them only where they measure faster. So do the three `prefetch=2` GEMVs (two weight tiles in
# flight, as the 16-bit GEMV that reads Llama-3-8B's weights at ~98% of the bandwidth; the int8
# GEMVs, one tile ahead, read the smaller Llama-3-8B shapes at ~2.3 TB/s on an H100).
DEFAULT_CONFIGS: tuple[QuantGemmConfig, ...] = (
    QuantGemmConfig(block_n=16, block_k=512, num_warps=4, num_stages=2, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=8, block_k=1024, num_warps=8, num_stages=2, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=32, block_k=256, num_warps=4, num_stages=2, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=4, block_k=1024, num_warps=8, num_stages=2, use_dot=False, max_rows=4, x_pairs=True),
    QuantGemmConfig(block_n=4, block_k=2048, num_warps=4, num_stages=2, use_dot=False, max_rows=4, x_pairs=True),
    QuantGemmConfig(block_n=8, block_k=512, num_warps=4, num_stages=2, use_dot=False, max_rows=4, x_pairs=True),
    QuantGemmConfig(block_n=16, block_k=512, num_warps=4, num_stages=2, use_dot=False, max_rows=4, prefetch=2),
    QuantGemmConfig(block_n=8, block_k=512, num_warps=4, num_stages=2, use_dot=False, max_rows=4, x_pairs=True,
                    prefetch=2),
    QuantGemmConfig(block_n=8, block_k=1024, num_warps=8, num_stages=2, use_dot=False, max_rows=4, prefetch=2),
    # int8 with x read as 64-bit quads in the codes' own layout (`x_quads`; the tiles above moved x
    # through shared memory behind barriers every iteration): the best at one row of some Llama-3-8B
    # or Qwen3-0.6B shape in two H100 runs (gpu_quant_gemm_int8_{xquads,candidates}_b1_h100-
    # 20261208.json; x_quads copies of the other int8 GEMVs above, K tiles of 4096 and two tiles
    # ahead were second or worse everywhere and are in the wide sweep only).
    *(QuantGemmConfig(block_n=n, block_k=k, num_warps=w, num_stages=2, use_dot=False, max_rows=4, x_quads=True)
      for n, k, w in ((16, 512, 4), (8, 512, 4), (4, 2048, 4), (2, 2048, 2), (8, 2048, 8))),
    QuantGemmConfig(block_n=16, block_k=1024, num_warps=4, num_stages=2, use_dot=False, max_rows=4, half2=True),
    QuantGemmConfig(block_n=32, block_k=1024, num_warps=4, num_stages=2, use_dot=False, max_rows=4, half2=True),
    QuantGemmConfig(block_n=16, block_k=512, num_warps=4, num_stages=2, use_dot=False, max_rows=4, half2=True),
    QuantGemmConfig(block_n=8, block_k=2048, num_warps=4, num_stages=2, use_dot=False, max_rows=4, half2=True),
    QuantGemmConfig(block_n=16, block_k=256, num_warps=4, num_stages=3),
    QuantGemmConfig(block_n=32, block_k=256, num_warps=4, num_stages=3),
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3),
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4),
    QuantGemmConfig(block_n=128, block_k=64, num_warps=4, num_stages=3, max_rows=4096),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=4, num_stages=3, split_k=4),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3, max_rows=4096),
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, bf16_pairs=True),
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4, bf16_pairs=True),
    QuantGemmConfig(block_n=128, block_k=64, num_warps=4, num_stages=3, max_rows=4096, bf16_pairs=True),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3, max_rows=4096, bf16_pairs=True),
    # The `weight_b` tiles (int4 with bf16 scales, `_quant_gemm_wb_kernel`): x @ W^T with the
    # dequantized weight tile stored once to shared memory as wgmma's B operand. At 64 rows on an
    # H100 (Llama-3-8B, 58 tilings, bf16 cuBLAS in the same run: benchmarks/results/
    # gpu_quant_gemm_int4_b64_weight_b_h100-20261207.json) each is the best of one shape:
    # qkv 20.68 us (cuBLAS 20.36; the best tile above 22.08), o 15.42 (14.60; 17.49),
    # down 41.73 (45.86; 46.45), gate/up 65.83 (84.61; 64.47).
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4, bf16_pairs=True, weight_b=True),
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=2, bf16_pairs=True, weight_b=True),
    QuantGemmConfig(block_n=128, block_k=256, num_warps=8, num_stages=3, split_k=4, bf16_pairs=True, weight_b=True),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=4, num_stages=3, bf16_pairs=True, weight_b=True),
    # The same four decoding the next weight tile after issuing this one's dot (`decode_ahead`: the
    # codes come a tile ahead into registers by plain loads). Llama-3-8B int4-g128 at 64 rows on an
    # H100 (gpu_quant_gemm_int4_b64_decode_ahead_h100-20261207.json): gate/up 64.77 us against
    # 66.33, down 38.94 against 41.46 (n128 k256 w8 sk4); that H100's start-up table then took them
    # for o, gate/up and down at 17-64 rows and the plain ones for qkv.
    *(dataclasses.replace(c, decode_ahead=True) for c in (
        QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4, bf16_pairs=True, weight_b=True),
        QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=2, bf16_pairs=True, weight_b=True),
        QuantGemmConfig(block_n=128, block_k=256, num_warps=8, num_stages=3, split_k=4, bf16_pairs=True,
                        weight_b=True),
        QuantGemmConfig(block_n=128, block_k=128, num_warps=4, num_stages=3, bf16_pairs=True, weight_b=True))),
)

# `dequantize`'s tile (rows, weights along K, warps). Prefill's dequantize-then-cuBLAS writes a
# 16-bit copy of each layer per chunk, so this pass is what a quantized layer adds to prefill.
# Chosen by `benchmarks/gpu_dequantize.py` on an H200 (Llama-3-8B's four projections, every
# variant first checked bit for bit against the twin): int4-g128 one layer 317.5 -> 152.9 us
# (2.08x), int4-g32 570.8 -> 162.2 us (3.5x), int8 172.4 -> 173.6 us (the same: every int8 tile
# within 1%, at ~90% of the copy bandwidth); benchmarks/results/gpu_dequantize_*_h200-20261207.json.
DEQUANTIZE_TILE: tuple[int, int, int] = (8, 512, 4)
DEQUANTIZE_GROUP_LOADS = True  # int4: scales loaded once per group and broadcast, not once per code byte
# Round to bf16 by integer arithmetic before the store only under the interpreter (whose cast
# truncates): a GPU's own conversion rounds to nearest even, bit for bit the same on the H200
# for every tile above, and the hand rounding cost int4-g128 ~14% of the pass.
DEQUANTIZE_HAND_ROUND = False

# More `weight_b` tilings for the wide sweep of `benchmarks/gpu_quant_gemm.py`: second-best on
# every shape of that sweep, so not timed at start-up.
WEIGHT_B_CANDIDATES: tuple[QuantGemmConfig, ...] = (
    QuantGemmConfig(block_n=128, block_k=128, num_warps=4, num_stages=3, split_k=4, bf16_pairs=True, weight_b=True),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3, split_k=4, bf16_pairs=True, weight_b=True),
)


# Byte j of an int32 word of int8 codes whose sign bits were flipped (q + 128), ORed into the
# mantissa of 2^23: the float32 2^23 + q + 128 in one `prmt` ($2: the word 0x4B000000, kept in a
# register so that the byte selector is the instruction's immediate). The x_quads GEMV subtracts
# 2^23 + 128 after it: three instructions a weight with the multiply-add, against four or five
# for the shift-mask-xor decode (`_decode_lane`).
INT8_LANE_TO_F32 = tuple(f"prmt.b32 $0, $1, $2, {0x7650 + j:#x};" for j in range(4))
INT8_MAGIC_WORD = 0x4B000000

if HAVE_TRITON:
    _INT4_WORD_TO_BF16 = tl.constexpr(INT4_WORD_TO_BF16)
    _INT8_LANES = tl.constexpr(INT8_LANE_TO_F32)
    _INT8_MAGIC_WORD = tl.constexpr(INT8_MAGIC_WORD)

    @triton.jit
    def _int4_words_to_bf16(words, scale, zero, ASM: tl.constexpr):
        """int32 words of eight int4 codes, with each word's group scale and zero (bf16, same
        shape) -> the weights, bf16, with a new last axis of 8 in k order: by PTX on a GPU
        (INT4_WORD_TO_BF16), by Triton arithmetic under the interpreter (which cannot run PTX)."""
        if ASM:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _INT4_WORD_TO_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [words, scale, zero],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            # (code - 8) * scale + zero in fp32, then rounded to bf16 by hand (the interpreter's
            # cast truncates); it can differ from the PTX's single bf16 rounding by an ulp when
            # |zero| dwarfs |scale|, so only this path is compared with the twin on the CPU.
            scale32 = scale.to(tl.float32)
            zero32 = zero.to(tl.float32)
            w0 = _round_for_store(_decode_lane(words, 0, True) * scale32 + zero32, True).to(tl.bfloat16)
            w1 = _round_for_store(_decode_lane(words, 1, True) * scale32 + zero32, True).to(tl.bfloat16)
            w2 = _round_for_store(_decode_lane(words, 2, True) * scale32 + zero32, True).to(tl.bfloat16)
            w3 = _round_for_store(_decode_lane(words, 3, True) * scale32 + zero32, True).to(tl.bfloat16)
            w4 = _round_for_store(_decode_lane(words, 4, True) * scale32 + zero32, True).to(tl.bfloat16)
            w5 = _round_for_store(_decode_lane(words, 5, True) * scale32 + zero32, True).to(tl.bfloat16)
            w6 = _round_for_store(_decode_lane(words, 6, True) * scale32 + zero32, True).to(tl.bfloat16)
            w7 = _round_for_store(_decode_lane(words, 7, True) * scale32 + zero32, True).to(tl.bfloat16)
        # join adds a last axis; nested, element (i0, i1, i2) lands at 4 i0 + 2 i1 + i2
        return tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))

    @triton.jit
    def _decode_lane(words, j: tl.constexpr, INT4: tl.constexpr):
        """Code j of every int32 word (int8: byte j, 4 a word; int4: nibble j, 8 a word) as
        an exact float32, without an int-to-float conversion (those run at a quarter of
        the FMA rate and would bound the GEMV): the code ORed into the mantissa of 2^23
        reads as 2^23 + code, and one subtraction leaves the signed value (int8: the byte
        with its sign bit flipped is q + 128; int4: the nibble minus 8)."""
        if INT4:
            value = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        else:
            value = (((words >> (8 * j)) & 255) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return value

    @triton.jit
    def _int8_lane(words, flipped, magic, j: tl.constexpr, ASM: tl.constexpr):
        """Code j of every int32 word of int8 codes as an exact float32: by one `prmt` of the
        sign-flipped word (`flipped`, INT8_LANE_TO_F32) where PTX runs, else `_decode_lane`."""
        if ASM:
            bits = tl.inline_asm_elementwise(_INT8_LANES[j], "=r,r,r", [flipped, magic], dtype=tl.int32, is_pure=True,
                                             pack=1)
            value = bits.to(tl.float32, bitcast=True) - 8388736.0
        else:
            value = _decode_lane(words, j, False)
        return value

    @triton.jit
    def _nibble(packed, shift: tl.constexpr, MAGIC: tl.constexpr):
        """The 4-bit code at `shift` of each uint8 as float32 (0..15)."""
        if MAGIC:
            value = (((packed >> shift) & 15).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            value = ((packed >> shift) & 15).to(tl.float32)
        return value

    @triton.jit
    def _signed_byte(codes, MAGIC: tl.constexpr):
        """int8 codes as exact float32 by the mantissa trick, or as they are (the caller casts)."""
        if MAGIC:
            value = ((codes.to(tl.int32) & 255) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            value = codes
        return value

    @triton.jit(do_not_specialize=["M"])
    def _quant_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
                           M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                           GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PDL: tl.constexpr, X_PAIRS: tl.constexpr,
                           WORD_SUMS: tl.constexpr, EPILOGUE: tl.constexpr = 0, PREFETCH: tl.constexpr = 1,
                           X_QUADS: tl.constexpr = False, ASM: tl.constexpr = False):
        """One token row times BLOCK_N output rows; `w_ptr` holds the codes as int32 words.
        Code j of every word is handled as its own [BLOCK_N, words] plane (the sum over k
        does not care about the order), so a thread decodes the words it loaded itself, with
        no reshapes and no cross-thread traffic inside the loop; products accumulate
        element-wise and are reduced once at the end. The token rows of one weight block are
        neighbouring programs, so rows after the first read it from L2. EPILOGUE as
        `triton_gemm.store_tile`'s (SiLU(gate) * up: gate rows, then the matching up rows).

        X_QUADS (int8, bf16 x; `x_ptr` is x viewed as int64): x is read as a [BLOCK_N, words]
        tile of 64-bit quads (the four x values of each word), zero stride along N: indexed like
        the words, so Triton gives it the words' own register layout and each thread loads the
        x of its words itself (the repeats hit L1). Read per code lane as a [words] vector
        instead, x comes in another layout and every iteration moved it through shared memory
        behind eight barriers (sm_90 SASS, Triton 3.6: 5.3 instead of 6.6 instructions a
        weight for 8 x 1024 tiles, and no barrier in the loop). With ASM its codes are decoded
        by `prmt` (INT8_LANE_TO_F32): 4.8 a weight for 8 x 1024, 4.0 for 32 x 256 (from 6.0)."""
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = tile_rows(pid_n, N, BLOCK_N, EPILOGUE)
        WORD_K: tl.constexpr = 8 if INT4 else 4
        WORDS: tl.constexpr = BLOCK_K // WORD_K
        offs_w = tl.arange(0, WORDS)
        k_words = K // WORD_K
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_w[None, :]
        words_next = tl.load(w_ptrs, mask=(offs_w < k_words)[None, :], other=0)
        if PREFETCH > 1:  # a second tile in flight too (as the 16-bit GEMV's prefetch=2)
            words_after = tl.load(w_ptrs + WORDS, mask=(WORDS + offs_w < k_words)[None, :], other=0)
        if PDL:  # the weights are nobody's output: the first tile(s) are read before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x_row = x_ptr + row * stride_xm
        if X_QUADS:
            x_quad = tl.zeros([BLOCK_N, 1], dtype=tl.int32) + offs_w[None, :]  # word i's quad, every row
            # The prmt's magic word as a value the compiler cannot fold (K >> 31 is 0 for any real K):
            # folded, ptxas takes it as the immediate and re-materializes the byte selector per use.
            magic = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32) + (_INT8_MAGIC_WORD | (K >> 31))
        acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            words = words_next
            if PREFETCH > 1:
                words_next = words_after
                words_after = tl.load(w_ptrs + (k + 2 * BLOCK_K) // WORD_K,
                                      mask=((k + 2 * BLOCK_K) // WORD_K + offs_w < k_words)[None, :], other=0)
            else:
                words_next = tl.load(w_ptrs + (k + BLOCK_K) // WORD_K,
                                     mask=((k + BLOCK_K) // WORD_K + offs_w < k_words)[None, :], other=0)
            k_of = k + offs_w * WORD_K  # first k of each word
            if INT4:  # each word's group's scale and zero (repeated addresses: served by L1)
                where = rows[:, None] * stride_sn + (k_of // GROUP)[None, :]
                word_ok = (k_of < K)[None, :]
                scale = tl.load(scale_ptr + where, mask=word_ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + where, mask=word_ok, other=0.0).to(tl.float32)
            if INT4 and WORD_SUMS:
                # sum_j ((c_j - 8) s + z) x_j = s sum_j (c_j - 8) x_j + z sum_j x_j: the scale and the
                # zero once a word (8 weights), not once a weight.
                products = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
                x_sums = tl.zeros([WORDS], dtype=tl.float32)
                for j in tl.static_range(WORD_K):
                    x = tl.load(x_row + k_of + j, mask=k_of + j < K, other=0.0).to(tl.float32)
                    products += _decode_lane(words, j, INT4) * x[None, :]
                    x_sums += x
                acc += products * scale + zero * x_sums[None, :]
            elif X_QUADS:  # int8, bf16 x as int64 quads in the words' layout: one load a word
                quad = tl.load(x_row + k // WORD_K + x_quad, mask=(k // WORD_K + x_quad) < k_words, other=0)
                low = quad.to(tl.int32)  # x0 | x1 << 16
                high = (quad >> 32).to(tl.int32)  # x2 | x3 << 16
                flipped = words ^ -2139062144  # 0x80808080: each byte q + 128, for the prmt decode
                acc += _int8_lane(words, flipped, magic, 0, ASM) * (low << 16).to(tl.float32, bitcast=True)
                acc += _int8_lane(words, flipped, magic, 1, ASM) * (low & -65536).to(tl.float32, bitcast=True)
                acc += _int8_lane(words, flipped, magic, 2, ASM) * (high << 16).to(tl.float32, bitcast=True)
                acc += _int8_lane(words, flipped, magic, 3, ASM) * (high & -65536).to(tl.float32, bitcast=True)
            elif X_PAIRS:  # bf16 x read as int32 pairs (x_ptr is x viewed as int32): half the loads
                for i in tl.static_range(WORD_K // 2):
                    pair = tl.load(x_row + k_of // 2 + i, mask=k_of + 2 * i < K, other=0)
                    x_even = (pair << 16).to(tl.float32, bitcast=True)[None, :]
                    x_odd = (pair & -65536).to(tl.float32, bitcast=True)[None, :]
                    if INT4:
                        acc += (_decode_lane(words, 2 * i, INT4) * scale + zero) * x_even
                        acc += (_decode_lane(words, 2 * i + 1, INT4) * scale + zero) * x_odd
                    else:
                        acc += _decode_lane(words, 2 * i, INT4) * x_even + _decode_lane(words, 2 * i + 1, INT4) * x_odd
            else:
                for j in tl.static_range(WORD_K):
                    x = tl.load(x_row + k_of + j, mask=k_of + j < K, other=0.0).to(tl.float32)
                    if INT4:
                        acc += (_decode_lane(words, j, INT4) * scale + zero) * x[None, :]
                    else:
                        acc += _decode_lane(words, j, INT4) * x[None, :]
        result = tl.sum(acc, axis=1)
        if not INT4:  # per-row scale: once, on the finished sums
            result = result * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows).to(tl.float32)
        store_row(result, row, pid_n, M, N, out_ptr, stride_om, BLOCK_N, EPILOGUE)

    @triton.jit
    def _load_codes(q_ptr, rows, stride_qn, k, K, BLOCK_K: tl.constexpr, INT4: tl.constexpr, PAIRS: tl.constexpr):
        """The code tile of weights [k, k + BLOCK_K) for `rows`, as stored (bytes: [rows, BLOCK_K or
        BLOCK_K / 2]) or, with PAIRS (int4), as int32 words of 8 codes ([rows, BLOCK_K / 8])."""
        if PAIRS:
            offs_word = tl.arange(0, BLOCK_K // 8)
            q_words = q_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_qn // 4)
            codes = tl.load(q_words + k // 8 + offs_word[None, :], mask=(k // 8 + offs_word < K // 8)[None, :],
                            other=0)
        else:
            BYTES: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
            offs_b = tl.arange(0, BYTES)
            b = k // 2 if INT4 else k
            codes = tl.load(q_ptr + rows[:, None] * stride_qn + b + offs_b[None, :],
                            mask=(b + offs_b < (K // 2 if INT4 else K))[None, :], other=0)
        return codes

    @triton.jit
    def _int4_tile(codes, scale, zero, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   PAIRS: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
        """An int4 code tile (`_load_codes`) dequantized to [BLOCK_N, BLOCK_K] in k order, with
        `scale` and `zero` [BLOCK_N, BLOCK_K / GROUP, 1]: in bf16 pairs by PTX (PAIRS), or the two
        nibble planes in fp32, joined back into k order (one dot on a plain x tile)."""
        if PAIRS:
            shape: tl.constexpr = [BLOCK_N, BLOCK_K // GROUP, GROUP // 8]
            w = _int4_words_to_bf16(tl.reshape(codes, shape), tl.broadcast_to(scale.to(tl.bfloat16), shape),
                                    tl.broadcast_to(zero.to(tl.bfloat16), shape), ASM)
        else:
            scale = scale.to(tl.float32)
            zero = zero.to(tl.float32) - 8.0 * scale  # the code offset folded in
            grouped = tl.reshape(codes, [BLOCK_N, BLOCK_K // GROUP, GROUP // 2])
            w = tl.join(_nibble(grouped, 0, MAGIC) * scale + zero, _nibble(grouped, 4, MAGIC) * scale + zero)
        return tl.reshape(w, [BLOCK_N, BLOCK_K])

    @triton.jit(do_not_specialize=["M"])
    def _quant_gemm_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                           M, N, K, stride_xm, stride_qn, stride_sn, stride_om, k_per_split,
                           GROUP: tl.constexpr, INT4: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, SPLIT_K: tl.constexpr,
                           MAGIC: tl.constexpr, PAIRS: tl.constexpr = False, ASM: tl.constexpr = False,
                           EPILOGUE: tl.constexpr = 0):
        """BLOCK_M token rows (>= 16, padded) times BLOCK_N output rows on the tensor cores
        (FlashDecoding++'s flat GEMM, the weights as the wide side). The code bytes are
        loaded as they are stored and cast straight into the dot (int8), or split into the
        low- and high-nibble planes and dequantized (int4), then joined back into k order for
        one dot against a contiguous x tile, so Triton's pipeliner stages the weight and x
        loads like a 16-bit GEMM's. With PAIRS (int4) the codes come as int32 words,
        dequantized in bf16 pairs (`_int4_words_to_bf16`) and joined into k order the same
        way. With SPLIT_K > 1, program (m, n, s) covers k in [s * k_per_split, (s + 1) *
        k_per_split) and `triton_gemm.finish_tile` sums the slices in the last program to arrive
        (a `SplitKWorkspace`: partials and counters), in a fixed order. EPILOGUE as
        `triton_gemm.store_tile`'s."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        safe_m = offs_m % M
        rows = tile_rows(pid_n, N, BLOCK_N, EPILOGUE)
        x_ptrs = x_ptr + safe_m[None, :] * stride_xm
        if PDL:  # x is the previous kernel's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        k_start = pid_k * k_per_split
        for k in range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K):
            codes = _load_codes(q_ptr, rows, stride_qn, k, K, BLOCK_K, INT4, PAIRS)
            if INT4:
                # One scale and zero per row and group, loaded once per tile and broadcast over
                # the group's codes.
                group = k // GROUP + tl.arange(0, BLOCK_K // GROUP)
                where = rows[:, None] * stride_sn + group[None, :]
                group_ok = (group < K // GROUP)[None, :]
                scale = tl.load(scale_ptr + where, mask=group_ok, other=0.0)[:, :, None]
                zero = tl.load(zero_ptr + where, mask=group_ok, other=0.0)[:, :, None]
                w = _int4_tile(codes, scale, zero, BLOCK_N, BLOCK_K, GROUP, PAIRS, MAGIC, ASM)
                kk = k + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptrs + kk[:, None], mask=(kk < K)[:, None], other=0.0)
                if IEEE:
                    acc = tl.dot(w.to(x.dtype), x, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w.to(x.dtype), x, acc)
            else:

                kk = k + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptrs + kk[:, None], mask=(kk < K)[:, None], other=0.0)
                if IEEE:
                    acc = tl.dot(_signed_byte(codes, MAGIC).to(x.dtype), x, acc, input_precision="ieee")
                else:
                    acc = tl.dot(_signed_byte(codes, MAGIC).to(x.dtype), x, acc)
        if not INT4:  # per-row scale: once, on the finished sums
            acc = acc * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)[:, None]
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        finish_tile(result, offs_m, pid_m, pid_n, pid_k, M, N, SPLIT_K, rows, bias_ptr, out_ptr, stride_om,
                    partial_ptr, counter_ptr, HAS_BIAS, BLOCK_M, BLOCK_N, EPILOGUE)

    @triton.jit
    def _group_params(s_ptrs, z_ptrs, g, offs_g, K, GROUP: tl.constexpr):
        """The scales and zeros of groups g + offs_g of a tile's rows (groups past K's: 0)."""
        ok = (g + offs_g < K // GROUP)[None, :]
        return tl.load(s_ptrs + g, mask=ok, other=0.0), tl.load(z_ptrs + g, mask=ok, other=0.0)

    @triton.jit
    def _wb_dot(x, w, acc, IEEE: tl.constexpr):
        """acc + x @ w^T, the dequantized weights rounded to x's dtype (fp32 x: IEEE products)."""
        if IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _quant_gemm_wb_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                              M, N, K, stride_xm, stride_qn, stride_sn, stride_om, k_per_split,
                              GROUP: tl.constexpr, INT4: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, SPLIT_K: tl.constexpr,
                              MAGIC: tl.constexpr, PAIRS: tl.constexpr = False, ASM: tl.constexpr = False,
                              EPILOGUE: tl.constexpr = 0, DECODE_AHEAD: tl.constexpr = False):
        """`_quant_gemm_kernel` with the operands swapped (`weight_b` tilings): acc [BLOCK_M, BLOCK_N]
        = x [BLOCK_M, BLOCK_K] @ W_tile^T, so x (staged by the pipeliner) is the dot's A operand and
        the dequantized weight tile its B operand, which on sm_90 goes through shared memory. Its
        other form keeps the weights as a register A operand in wgmma's layout, where each thread
        holds k pairs 8 apart: the codes come out of shared memory a byte a load, and ptxas
        serializes the wgmmas (each waits for the last, whose A registers the next reuses).
        Here the codes are decoded in the load's own layout (8-byte shared-memory loads) and
        stored once for wgmma (16-byte stores). The group scales and zeros (2-byte loads, which
        the pipeliner does not stage) are loaded a tile ahead, to hide their latency behind a tile.
        DECODE_AHEAD (int4, `decode_ahead` tilings): the loop issues tile i's dot, then decodes tile
        i + 1, whose codes come into registers by plain loads a tile ahead (Triton 3.6 still waits
        for each wgmma before the decode: the gain is the codes' shared-memory round trip and barrier,
        ~4% on Llama-3-8B's gate/up and 6% on down at 64 rows, H100)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        safe_m = offs_m % M
        rows = tile_rows(pid_n, N, BLOCK_N, EPILOGUE)
        x_ptrs = x_ptr + safe_m[:, None] * stride_xm
        k_start = pid_k * k_per_split
        # A tile spans whole groups, or (BLOCK_K < GROUP: a smaller tile, so more programs fit an SM)
        # lies inside one: then its one scale is group k // GROUP's, and it decodes as a group of its own.
        TILE_GROUP: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        GROUPS: tl.constexpr = BLOCK_K // TILE_GROUP if INT4 else 1
        offs_g = tl.arange(0, GROUPS)
        s_ptrs = scale_ptr + rows[:, None] * stride_sn + offs_g[None, :]
        z_ptrs = zero_ptr + rows[:, None] * stride_sn + offs_g[None, :]
        if INT4:  # the first tile's scales and zeros: weights, so read before PDL's wait
            scale_next, zero_next = _group_params(s_ptrs, z_ptrs, k_start // GROUP, offs_g, K, GROUP)
        if PDL:  # x is the previous kernel's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_end = tl.minimum(K, k_start + k_per_split)
        if DECODE_AHEAD and INT4:
            # The tile after this one is decoded after this one's dot is issued, its codes loaded into
            # registers a tile ahead (plain loads, no shared-memory round trip); the first tile before
            # the loop. Triton 3.6 waits for the wgmma before the decode all the same (sm_90 SASS).
            w = _int4_tile(_load_codes(q_ptr, rows, stride_qn, k_start, K, BLOCK_K, INT4, PAIRS),
                           scale_next[:, :, None], zero_next[:, :, None], BLOCK_N, BLOCK_K, TILE_GROUP, PAIRS, MAGIC,
                           ASM)
            scale_next, zero_next = _group_params(s_ptrs, z_ptrs, (k_start + BLOCK_K) // GROUP, offs_g, K, GROUP)
            for k in range(k_start, k_end, BLOCK_K):
                kk = k + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptrs + kk[None, :], mask=(kk < K)[None, :], other=0.0)
                # the next tile's codes (past K: masked; past this slice: read, never used)
                codes = _load_codes(q_ptr, rows, stride_qn, k + BLOCK_K, K, BLOCK_K, INT4, PAIRS)
                acc = _wb_dot(x, w, acc, IEEE)
                scale = scale_next[:, :, None]
                zero = zero_next[:, :, None]
                scale_next, zero_next = _group_params(s_ptrs, z_ptrs, (k + 2 * BLOCK_K) // GROUP, offs_g, K, GROUP)
                w = _int4_tile(codes, scale, zero, BLOCK_N, BLOCK_K, TILE_GROUP, PAIRS, MAGIC, ASM)
        else:
            for k in range(k_start, k_end, BLOCK_K):
                codes = _load_codes(q_ptr, rows, stride_qn, k, K, BLOCK_K, INT4, PAIRS)
                if INT4:
                    scale = scale_next[:, :, None]
                    zero = zero_next[:, :, None]
                    # the next tile's (past the end: masked, or unused)
                    scale_next, zero_next = _group_params(s_ptrs, z_ptrs, (k + BLOCK_K) // GROUP, offs_g, K, GROUP)
                    w = _int4_tile(codes, scale, zero, BLOCK_N, BLOCK_K, TILE_GROUP, PAIRS, MAGIC, ASM)
                else:
                    w = _signed_byte(codes, MAGIC)
                kk = k + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptrs + kk[None, :], mask=(kk < K)[None, :], other=0.0)
                acc = _wb_dot(x, w, acc, IEEE)
        if not INT4:  # per-row scale: once, on the finished sums
            acc = acc * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)[None, :]
        finish_tile(acc, offs_m, pid_m, pid_n, pid_k, M, N, SPLIT_K, rows, bias_ptr, out_ptr, stride_om,
                    partial_ptr, counter_ptr, HAS_BIAS, BLOCK_M, BLOCK_N, EPILOGUE)


if HAVE_TRITON:

    @triton.jit
    def _round_for_store(w, BF16: tl.constexpr):
        """fp32 weights rounded (to nearest even) onto bf16's grid, still fp32, so the store's
        conversion is exact: the GPU rounds so itself, the Triton interpreter truncates."""
        if BF16:
            bits = w.to(tl.int32, bitcast=True)
            w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        return w

    @triton.jit
    def _dequantize_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_q, stride_s, stride_out,
                           GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BF16: tl.constexpr, HAND_ROUND: tl.constexpr, GROUP_LOADS: tl.constexpr):
        """W [N, K] in out_ptr's dtype from its stored form, in fp32 as `dequantize_reference`
        computes it (launched without FMA contraction, so int4's c * s + z rounds twice as
        there) and rounded once: a 16-bit copy for dequantize-then-cuBLAS, one pass over the codes.
        HAND_ROUND: round to bf16 by integer arithmetic first (the interpreter truncates; a GPU's
        store conversion rounds to nearest even by itself). GROUP_LOADS (int4, BLOCK_K a multiple
        of GROUP): one scale and zero load per group of a row, broadcast, not one per code byte."""
        n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rows_ok = n < N
        if INT4:  # one byte = inputs 2j (low nibble) and 2j + 1 (high), of one group
            j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            mask = rows_ok[:, None] & (j[None, :] < K // 2)
            packed = tl.load(q_ptr + n[:, None] * stride_q + j[None, :], mask=mask, other=0).to(tl.int32)
            if GROUP_LOADS:
                groups = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
                group_mask = rows_ok[:, None] & (groups[None, :] < K // GROUP)
                at = n[:, None] * stride_s + groups[None, :]
                scale = tl.load(scale_ptr + at, mask=group_mask, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + at, mask=group_mask, other=0.0).to(tl.float32)
                shape3: tl.constexpr = (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)
                codes = tl.reshape(packed, shape3)
                low = tl.reshape(((codes & 15) - 8).to(tl.float32) * scale[:, :, None] + zero[:, :, None],
                                 (BLOCK_N, BLOCK_K // 2))
                high = tl.reshape(((codes >> 4) - 8).to(tl.float32) * scale[:, :, None] + zero[:, :, None],
                                  (BLOCK_N, BLOCK_K // 2))
            else:
                at = n[:, None] * stride_s + ((2 * j) // GROUP)[None, :]
                scale = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + at, mask=mask, other=0.0).to(tl.float32)
                low = ((packed & 15) - 8).to(tl.float32) * scale + zero
                high = ((packed >> 4) - 8).to(tl.float32) * scale + zero
            # Inputs 2j and 2j + 1 side by side: one contiguous store of the whole tile. Two
            # stores at a stride of 2 elements (the first version) took 212 us for Llama-3-8B's
            # qkv weight on an H100 (this: 40 us; gate/up 955 -> 187 us), ten times the cuBLAS
            # GEMM after it at 64 rows (benchmarks/results/gpu_dequantize_int4_h100-20261207.json).
            w = tl.interleave(low, high)
            k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            tl.store(out_ptr + n[:, None] * stride_out + k[None, :],
                     _round_for_store(w, BF16 and HAND_ROUND).to(out_ptr.dtype.element_ty),
                     mask=rows_ok[:, None] & (k[None, :] < K))
        else:
            k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = rows_ok[:, None] & (k[None, :] < K)
            codes = tl.load(q_ptr + n[:, None] * stride_q + k[None, :], mask=mask, other=0).to(tl.float32)
            scale = tl.load(scale_ptr + n * stride_s, mask=rows_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + n[:, None] * stride_out + k[None, :],
                     _round_for_store(codes * scale[:, None], BF16 and HAND_ROUND).to(out_ptr.dtype.element_ty),
                     mask=mask)


def check_dequantize_tile(tile: tuple[int, int, int]) -> tuple[int, int, int]:
    """`tile` (rows, K, warps) if `_dequantize_kernel` can take it, else ValueError naming the rule."""
    block_n, block_k, num_warps = tile
    if any(v < 1 or v & (v - 1) for v in (block_n, block_k, num_warps)) or block_k < 2 or num_warps > 32:
        raise ValueError(f"dequantize tile {(block_n, block_k, num_warps)}: rows, K and warps must be powers of "
                         "two (K at least 2, warps at most 32)")
    return tile


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int, dtype: torch.dtype,
               use_triton: bool | None = None, tile: tuple[int, int, int] | None = None,
               group_loads: bool | None = None, hand_round: bool | None = None) -> torch.Tensor:
    """`dequantize_reference(...).to(dtype)`, bit for bit; by one Triton pass on CUDA (or
    with use_triton=True, under the interpreter). The twin builds two float32 copies of W
    on the way (8 bytes an element); on an H100 that made dequantize-then-cuBLAS for
    Llama-3-8B's gate/up projection cost ~0.9 ms of dequantizing, which priced it out of
    prefill, where cuBLAS's tensor cores beat the in-kernel dequantizing GEMM. `tile` (rows, K,
    warps), `group_loads` and `hand_round` override DEQUANTIZE_TILE, DEQUANTIZE_GROUP_LOADS and
    DEQUANTIZE_HAND_ROUND (`benchmarks/gpu_dequantize.py` times them; the interpreter always
    rounds by hand, since it truncates)."""
    if use_triton is None:
        use_triton = HAVE_TRITON and q.is_cuda
    if not use_triton:
        return dequantize_reference(q, scales, zeros, group).to(dtype)
    int4 = zeros is not None
    n, k = q.shape[0], q.shape[1] * (2 if int4 else 1)
    if int4 and (group % 2 or k % group):
        raise ValueError(f"int4 needs an even group ({group}) dividing K ({k})")
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    if n and k:
        block_n, block_k, num_warps = check_dequantize_tile(tile or DEQUANTIZE_TILE)
        # Per-group loads reshape a tile into whole groups: block_k a multiple of a power-of-two group.
        group_loads = (DEQUANTIZE_GROUP_LOADS if group_loads is None else group_loads) and int4 \
            and block_k % group == 0 and group & (group - 1) == 0
        scales2 = scales.reshape(n, -1)
        _dequantize_kernel[(-(-n // block_n), -(-k // block_k))](
            q, scales2, zeros.reshape(n, -1) if int4 else scales2, out, n, k, q.stride(0), scales2.stride(0),
            out.stride(0), GROUP=group, INT4=int4, BLOCK_N=block_n, BLOCK_K=block_k, BF16=dtype == torch.bfloat16,
            HAND_ROUND=(DEQUANTIZE_HAND_ROUND if hand_round is None else hand_round) or not use_asm(q.device),
            GROUP_LOADS=group_loads, num_warps=num_warps,
            enable_fp_fusion=False)
    return out


def code_words(q: torch.Tensor) -> torch.Tensor:
    """The stored codes (int8 [N, K] or packed int4 [N, K/2]) viewed as int32 words, as the
    kernels read them (4 int8 or 8 int4 codes a word); rows must hold whole words."""
    if q.shape[1] % 4 or q.stride(1) != 1 or q.stride(0) % 4:
        raise ValueError(f"the codes' rows ({q.shape[1]} bytes) must be contiguous whole 4-byte words")
    return q.view(torch.int32)


def _int32_pairs_ok(x2: torch.Tensor) -> bool:
    """Whether a 16-bit [rows, K] tensor can be read as int32 pairs (even row stride and start)."""
    return x2.stride(0) % 2 == 0 and x2.storage_offset() % 2 == 0


def _int64_quads_ok(x2: torch.Tensor) -> bool:
    """Whether a 16-bit [rows, K] tensor can be read as int64 quads (K, the row stride and the
    start multiples of four)."""
    return x2.shape[1] % 4 == 0 and x2.stride(0) % 4 == 0 and x2.storage_offset() % 4 == 0


def gated_fits(n: int, config: QuantGemmConfig, bias: torch.Tensor | None) -> bool:
    """Whether `config` can run SiLU(gate) * up in its epilogue for a [gate; up] weight of n
    rows: a tile holds block_n / 2 gate rows and the matching up rows, so each half must split
    into whole tiles; a bias is not fused (no model has one on gate/up)."""
    return bias is None and config.block_n >= 2 and n % 2 == 0 and (n // 2) % (config.block_n // 2) == 0


def _block_k(k: int, group: int, int4: bool, config: QuantGemmConfig) -> int:
    """The K tile a call runs with: int4 tiles span whole groups (`weight_b` tiles may instead lie
    inside one: both are powers of two) and at least 16 bytes a row; a dot tile's K is at least 16
    (int4: 32 weights, 16 a nibble plane)."""
    if int4:
        block_k = max(config.block_k, MIN_INT4_BLOCK_K, 1 if config.weight_b and config.use_dot else group)
    else:
        block_k = config.block_k
    if config.use_dot:
        block_k = max(block_k, 2 * DOT_MIN_ROWS if int4 else DOT_MIN_ROWS)
    return block_k


def _dot_split(rows: int, k: int, block_k: int, config: QuantGemmConfig) -> tuple[int, int, int]:
    """(block_m, split, k_per_split) of a dot-tile call: no empty slices."""
    tiles = -(-k // block_k)
    split = max(1, min(config.split_k, tiles))
    k_per_split = -(-tiles // split) * block_k
    return config.block_m(rows), -(-k // k_per_split), k_per_split


def workspace_size(rows: int, n: int, k: int, group: int, int4: bool, config: QuantGemmConfig) -> tuple[int, int]:
    """(partial floats, counters) a call of `config` on `rows` rows needs; (0, 0) without split-K."""
    if not config.use_dot:
        return 0, 0
    block_m, split, _ = _dot_split(rows, k, _block_k(k, group, int4, config), config)
    if split == 1:
        return 0, 0
    return split * rows * n, -(-rows // block_m) * -(-n // config.block_n)


def triton_quant_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bias: torch.Tensor | None, group: int, config: QuantGemmConfig,
                      epilogue: int = EPILOGUE_NONE, workspace: SplitKWorkspace | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for W stored as int8 (zeros None, scales [N, 1]) or int4 (q [N, K/2]
    uint8, scales and zeros [N, K/group]); x [..., K] 16-bit or fp32. With
    epilogue=EPILOGUE_SILU_MUL (W the fused [gate; up] projection, `gated_fits`), SiLU(gate) *
    up [..., N / 2] in the same launch, bit for bit this GEMM then `fused.silu_mul`. Split-K
    tiles sum their slices in the kernel, through `workspace` (a fresh one, zeroed, where it is
    None or too small: one memset more per call)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use quant_gemm_reference")
    int4 = zeros is not None
    n = q.shape[0]
    k = q.shape[1] * (2 if int4 else 1)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
    if epilogue == EPILOGUE_SILU_MUL and not gated_fits(n, config, bias):
        raise ValueError(f"{config.name} cannot fuse SiLU * up for a [gate; up] weight of {n} rows "
                         f"(each half must split into {config.block_n // 2}-row tiles, no bias)")
    if int4 and (k % group or group & (group - 1) or group < 8 or config.block_k & (config.block_k - 1)):
        raise ValueError(f"int4 needs K ({k}) divisible by the group ({group}), and the group (>= 8) and "
                         f"block_k ({config.block_k}) powers of two")
    block_k = _block_k(k, group, int4, config)
    words = code_words(q)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    width = n // 2 if epilogue == EPILOGUE_SILU_MUL else n
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows:
        common = dict(GROUP=group, INT4=int4, BLOCK_N=config.block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
                      EPILOGUE=epilogue, num_warps=config.num_warps, num_stages=config.num_stages,
                      **pdl.kernel_args(x2.device, rows))
        # The dot kernel reads the code bytes as stored, the GEMV the same bytes as int32 words.
        codes = q if config.use_dot else words
        tensors = (x2, codes, scales, zeros if int4 else scales, bias if bias is not None else out, out,
                   rows, n, k, x2.stride(0), codes.stride(0), scales.stride(0), out.stride(0))
        if config.use_dot:
            block_m, split, k_per_split = _dot_split(rows, k, block_k, config)
            grid = (-(-rows // block_m), -(-n // config.block_n), split)
            common.update(PAIRS=config.bf16_pairs and int4 and x2.dtype in PAIRS_DTYPES, ASM=use_asm(x2.device))
            # Without split-K the workspace arguments are never touched, but typed like the real ones.
            partials, counters = split_k_placeholders(x2.device)
            if split > 1:
                need = (split * rows * n, grid[0] * grid[1])
                if workspace is None or not workspace.fits(*need):
                    workspace = SplitKWorkspace(x2.device, *need)
                partials, counters = workspace.partials, workspace.counters
            if config.weight_b:
                common.update(DECODE_AHEAD=config.decode_ahead)
            kernel = _quant_gemm_wb_kernel if config.weight_b else _quant_gemm_kernel
            kernel[grid](*tensors[:6], partials, counters, *tensors[6:], k_per_split, BLOCK_M=block_m,
                         IEEE=x2.dtype == torch.float32, SPLIT_K=split, MAGIC=config.magic_decode, **common)
        elif config.half2 and int4 and x2.dtype == torch.bfloat16 and _int32_pairs_ok(x2):
            int4_gemv_half2(x2, words, scales, zeros, bias, out, group, config.block_n, block_k, config.num_warps,
                            config.num_stages, epilogue)
        elif config.x_quads and not int4 and x2.dtype == torch.bfloat16 and _int64_quads_ok(x2):
            quads = x2.view(torch.int64)
            _quant_gemv_kernel[(rows, -(-n // config.block_n))](quads, *tensors[1:9], quads.stride(0), *tensors[10:],
                                                                 X_PAIRS=False, WORD_SUMS=False, X_QUADS=True,
                                                                 ASM=use_asm(x2.device), PREFETCH=config.prefetch,
                                                                 **common)
        elif config.x_pairs and not (int4 and config.word_sums) and x2.dtype == torch.bfloat16 \
                and _int32_pairs_ok(x2):
            pairs = x2.view(torch.int32)
            _quant_gemv_kernel[(rows, -(-n // config.block_n))](pairs, *tensors[1:9], pairs.stride(0), *tensors[10:],
                                                                 X_PAIRS=True, WORD_SUMS=False,
                                                                 PREFETCH=config.prefetch, **common)
        else:
            _quant_gemv_kernel[(rows, -(-n // config.block_n))](*tensors, X_PAIRS=False,
                                                                 WORD_SUMS=config.word_sums,
                                                                 PREFETCH=config.prefetch, **common)
    return out.reshape(*lead, width)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) from two-per-byte [N, K/2] uint8 (low nibble = even k)."""
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpack_int4`: [N, K] codes 0..15 (K even) -> [N, K/2] uint8."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int) -> torch.Tensor:
    """The float32 weight [N, K] a stored form stands for."""
    if zeros is None:
        return q.float() * scales.float().reshape(-1, 1)
    codes = unpack_int4(q).float() - 8.0
    n, k = codes.shape
    w = codes.view(n, k // group, group) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(n, k)


def quant_gemm_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """The twin of `triton_quant_gemm`: dequantize to float32, then `F.linear` in x's dtype."""
    weight = dequantize_reference(q, scales, zeros, group)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
