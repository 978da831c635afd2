"""int4 GEMV that decodes two codes per instruction in half-precision pairs (Marlin's trick).

The plain int4 GEMV of `triton_quant_gemm` spends ~7 instructions a weight (shift, mask,
OR into a float's mantissa, subtract, scale-and-zero FMA, multiply-add with x, and per-word
scale loads), so on an H100 it is bound by instruction issue at 0.75-1.16 TB/s, far below
the bytes' roofline. Here one 32-bit word of eight codes is decoded in fp16x2 registers:
`lop3` ORs two nibbles at once into the mantissas of two fp16 1024s, one `sub`/`fma.f16x2`
leaves the two signed codes (code - 8) exactly, and `fma.f16x2` multiplies them into two x
values; the word's eight products end as two fp16 sums, added in fp32 (~16 instructions a
word, 2 a weight). The group's scale multiplies those fp32 partials once per word, and its
zero point multiplies the word's sum of x once per word (sum_k ((c - 8) s + z) x_k = s sum_k
(c - 8) x_k + z sum_k x_k), so neither is applied per weight.

x (bf16) is converted once per thread and word to fp16 pairs in the codes' order (x0/x4,
x1/x5, x2/x6, x3/x7: the nibble pairs a `lop3` picks), scaled by 2^-8 so that products and
their four-term sums stay inside fp16's range for any |x| < 5e5 (the scale is a power of two
and is undone in fp32 at the end); its fp32 sum serves the zero points. A word's four
fp16 multiply-adds round at fp16's 11 bits, finer than the bf16 rounding the reference's
dequantized weight already carries.

The PTX runs only on NVIDIA GPUs (sm_80+). With `ASM=False` the same kernel computes the
partials with plain Triton arithmetic in fp32 (x still rounded through fp16 as above): that
is what the Triton interpreter runs in CI, so the tiling, the x pairing, the masks and the
scale/zero handling are tested on the CPU; the PTX itself is compiled for sm_90 in CI and
checked against the twin by the GPU tests and by the start-up dispatch table, which rejects
a tiling whose output disagrees with the twin before timing it.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import pdl
from thinkwise.kernels.device_info import use_asm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch twin runs instead
    triton = None
    tl = None

X_SCALE = 2.0 ** -8  # x is scaled by this into fp16 (undone in fp32 at the end; 0f3B800000 in the PTX)
WORD_CODES = 8

# x (four bf16 pairs as 32-bit words: x0|x1, x2|x3, x4|x5, x6|x7) -> four fp16 pairs in the
# codes' lop3 order (x0|x4, x1|x5, x2|x6, x3|x7; low half first), each x scaled by 2^-8,
# and the fp32 sum of the eight unscaled values. A bf16 is the top half of its float32.
X_TO_HALF_PAIRS = """{
.reg .b32 f<8>, t;
shl.b32 f0, $5, 16;
and.b32 f1, $5, 0xffff0000;
shl.b32 f2, $6, 16;
and.b32 f3, $6, 0xffff0000;
shl.b32 f4, $7, 16;
and.b32 f5, $7, 0xffff0000;
shl.b32 f6, $8, 16;
and.b32 f7, $8, 0xffff0000;
add.f32 t, f0, f1;
add.f32 t, t, f2;
add.f32 t, t, f3;
add.f32 t, t, f4;
add.f32 t, t, f5;
add.f32 t, t, f6;
add.f32 $4, t, f7;
mul.f32 f0, f0, 0f3B800000;
mul.f32 f1, f1, 0f3B800000;
mul.f32 f2, f2, 0f3B800000;
mul.f32 f3, f3, 0f3B800000;
mul.f32 f4, f4, 0f3B800000;
mul.f32 f5, f5, 0f3B800000;
mul.f32 f6, f6, 0f3B800000;
mul.f32 f7, f7, 0f3B800000;
cvt.rn.f16x2.f32 $0, f4, f0;
cvt.rn.f16x2.f32 $1, f5, f1;
cvt.rn.f16x2.f32 $2, f6, f2;
cvt.rn.f16x2.f32 $3, f7, f3;
}"""

# One word of eight int4 codes (nibble j = input j) times the four x pairs above: the fp32
# sum of the eight (code - 8) * x * 2^-8. lop3 (w & mask) | 0x6400 puts two nibbles into the
# mantissas of two fp16 1024s: 1024 + c (low nibbles, minus 1032 = c - 8) and 1024 + 16c
# (high nibbles, times 1/16 minus 72 = c - 8), exactly.
WORD_DOT = """{
.reg .b32 a, b, s, p, m, sixteenth, off;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x64086408;
mov.b32 sixteenth, 0x2c002c00;
mov.b32 off, 0xd480d480;
lop3.b32 a, $1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b, $1, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 a, a, m;
fma.rn.f16x2 b, b, sixteenth, off;
mul.rn.f16x2 p, a, $2;
fma.rn.f16x2 p, b, $3, p;
shr.u32 s, $1, 8;
lop3.b32 a, s, 0x000f000f, 0x64006400, 0xea;
lop3.b32 b, s, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 a, a, m;
fma.rn.f16x2 b, b, sixteenth, off;
fma.rn.f16x2 p, a, $4, p;
fma.rn.f16x2 p, b, $5, p;
mov.b32 {lo, hi}, p;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}"""


if triton is not None:
    from thinkwise.kernels.triton_gemm import store_row, tile_rows

    # Kernels may read module globals only as constexprs.
    _X_TO_HALF_PAIRS = tl.constexpr(X_TO_HALF_PAIRS)
    _WORD_DOT = tl.constexpr(WORD_DOT)
    _X_SCALE = tl.constexpr(X_SCALE)

    @triton.jit
    def _x_half_pairs(xa, xb, xc, xd, ASM: tl.constexpr):
        """Four bf16 pairs (int32) -> four fp16 pairs (int32, x*2^-8) in lop3 order, and the
        fp32 sum of the eight x."""
        if ASM:
            h04, h15, h26, h37, total = tl.inline_asm_elementwise(
                _X_TO_HALF_PAIRS, "=r,=r,=r,=r,=r,r,r,r,r", [xa, xb, xc, xd],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32), is_pure=True, pack=1)
        else:  # the interpreter: the same values with Triton arithmetic
            x0 = (xa << 16).to(tl.float32, bitcast=True)
            x1 = (xa & -65536).to(tl.float32, bitcast=True)
            x2 = (xb << 16).to(tl.float32, bitcast=True)
            x3 = (xb & -65536).to(tl.float32, bitcast=True)
            x4 = (xc << 16).to(tl.float32, bitcast=True)
            x5 = (xc & -65536).to(tl.float32, bitcast=True)
            x6 = (xd << 16).to(tl.float32, bitcast=True)
            x7 = (xd & -65536).to(tl.float32, bitcast=True)
            total = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
            h04 = _pack_halves(x0, x4)
            h15 = _pack_halves(x1, x5)
            h26 = _pack_halves(x2, x6)
            h37 = _pack_halves(x3, x7)
        return h04, h15, h26, h37, total

    @triton.jit
    def _pack_halves(low, high):
        """Two float32 (times 2^-8, rounded to fp16) packed into one int32, `low` in the low half."""
        lo = (low * _X_SCALE).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        hi = (high * _X_SCALE).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        return lo | hi

    @triton.jit
    def _half(pair, upper: tl.constexpr):
        """One fp16 of an int32 pair as float32."""
        if upper:
            bits = (pair >> 16) & 65535
        else:
            bits = pair & 65535
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _word_dot(words, h04, h15, h26, h37, ASM: tl.constexpr):
        """sum_j (code_j - 8) * x_j * 2^-8 over each word's eight codes, as float32."""
        if ASM:
            partial = tl.inline_asm_elementwise(_WORD_DOT, "=r,r,r,r,r,r", [words, h04, h15, h26, h37],
                                                dtype=tl.float32, is_pure=True, pack=1)
        else:
            partial = ((words & 15) - 8).to(tl.float32) * _half(h04, False)
            partial += (((words >> 4) & 15) - 8).to(tl.float32) * _half(h15, False)
            partial += (((words >> 8) & 15) - 8).to(tl.float32) * _half(h26, False)
            partial += (((words >> 12) & 15) - 8).to(tl.float32) * _half(h37, False)
            partial += (((words >> 16) & 15) - 8).to(tl.float32) * _half(h04, True)
            partial += (((words >> 20) & 15) - 8).to(tl.float32) * _half(h15, True)
            partial += (((words >> 24) & 15) - 8).to(tl.float32) * _half(h26, True)
            partial += (((words >> 28) & 15) - 8).to(tl.float32) * _half(h37, True)
        return partial

    @triton.jit(do_not_specialize=["M"])
    def _int4_gemv_half2_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
                                M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
                                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                HAS_BIAS: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                                EPILOGUE: tl.constexpr = 0):
        """One token row (x_ptr: bf16 x viewed as int32 pairs) times BLOCK_N output rows
        (w_ptr: the codes as int32 words). A tile is [BLOCK_N, groups, words of a group], so
        a group's scale and zero are loaded once per thread and row, not once per word.

        Triton gives the word loads a vectorized layout (four words a thread) and the x and
        scale loads others, so each iteration converts the word tile through shared memory
        (~3.2 instructions a weight on sm_90 all told). Hiding the contiguity instead (one
        layout, no conversion, but an address and a load per word and per row's scale and
        zero: ~4.9 instructions a weight) measured 1.1-2x slower on an H100 on every
        Llama-3-8B and Qwen3-0.6B shape, so it was dropped. EPILOGUE as
        `triton_gemm.store_tile`'s (SiLU(gate) * up: gate rows, then the matching up rows)."""
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = tile_rows(pid_n, N, BLOCK_N, EPILOGUE)
        WPG: tl.constexpr = GROUP // 8  # words per group
        GT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
        g = tl.arange(0, GT)
        word = (g[:, None] * WPG + tl.arange(0, WPG)[None, :])[None, :, :]  # [1, GT, WPG]
        groups = K // GROUP
        w_ptrs = w_ptr + rows[:, None, None] * stride_wn + word
        words_next = tl.load(w_ptrs, mask=(g < groups)[None, :, None], other=0)
        if PDL:  # the weights are nobody's output: the first tile is read before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x_row = x_ptr + row * stride_xm
        acc = tl.zeros([BLOCK_N, GT, WPG], dtype=tl.float32)
        acc_zero = tl.zeros([BLOCK_N, GT, WPG], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            words = words_next
            g_next = (k + BLOCK_K) // GROUP + g
            words_next = tl.load(w_ptrs + (k + BLOCK_K) // 8, mask=(g_next < groups)[None, :, None], other=0)
            group = k // GROUP + g
            group_ok = group < groups
            x_at = x_row + (k // 8 + word) * 4  # four int32 pairs a word
            x_ok = group_ok[None, :, None]
            h04, h15, h26, h37, x_sum = _x_half_pairs(
                tl.load(x_at, mask=x_ok, other=0), tl.load(x_at + 1, mask=x_ok, other=0),
                tl.load(x_at + 2, mask=x_ok, other=0), tl.load(x_at + 3, mask=x_ok, other=0), ASM)
            # Scales and zeros loaded in the tile's own 3-D layout ([BLOCK_N, GT, 1]), and the zero
            # applied per word against the word's x sum: reducing x over a group first, or
            # broadcasting 2-D scales, makes Triton move data through shared memory behind a
            # barrier every iteration.
            where = rows[:, None, None] * stride_sn + group[None, :, None]
            scale = tl.load(scale_ptr + where, mask=x_ok, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + where, mask=x_ok, other=0.0).to(tl.float32)
            acc += _word_dot(words, h04, h15, h26, h37, ASM) * scale
            acc_zero += zero * x_sum
        result = tl.sum(tl.sum(acc / _X_SCALE + acc_zero, axis=2), axis=1)
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows).to(tl.float32)
        store_row(result, row, pid_n, M, N, out_ptr, stride_om, BLOCK_N, EPILOGUE)


def int4_gemv_half2(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: torch.Tensor | None, out: torch.Tensor, group: int, block_n: int, block_k: int,
                    num_warps: int, num_stages: int, epilogue: int = 0) -> None:
    """out[rows, N] = x2 [rows, K] (bf16, rows <= a few) @ W.T (+ bias), W int4 as `words`
    (the packed codes viewed as int32). block_k (a power of two) must cover whole groups.
    epilogue: as `triton_quant_gemm`'s (SiLU * up: out is [rows, N / 2])."""
    rows, k = x2.shape
    n = words.shape[0]
    if x2.dtype != torch.bfloat16 or x2.stride(-1) != 1 or x2.stride(0) % 2 or x2.storage_offset() % 2:
        raise ValueError("the half-pair int4 GEMV takes contiguous bf16 rows starting on even elements")
    if block_k % group or k % group or group % WORD_CODES:
        raise ValueError(f"block_k ({block_k}) and K ({k}) must be multiples of the group ({group}), "
                         f"itself a multiple of {WORD_CODES}")
    pairs = x2.view(torch.int32)
    _int4_gemv_half2_kernel[(rows, -(-n // block_n))](
        pairs, words, scales, zeros, bias if bias is not None else out, out, rows, n, k, pairs.stride(0),
        words.stride(0), scales.stride(0), out.stride(0), GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, ASM=use_asm(x2.device), EPILOGUE=epilogue, num_warps=num_warps,
        num_stages=num_stages,
        **pdl.kernel_args(x2.device, rows))
