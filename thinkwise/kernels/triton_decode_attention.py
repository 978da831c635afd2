"""Paged decode attention in Triton: split-KV (FlashDecoding), FlashDecoding++'s unified max, cascade.

One program of the split kernel handles one sequence, one KV head (all the query heads
of its group at once, so grouped-query attention reads each K/V tile once) and one
split of the context, gathering each token's cache slot through the block table; a
merge kernel combines the splits. Splitting the context gives a single long sequence
enough programs to fill the GPU.

Two softmax modes. Synchronized: each split keeps a running max, rescales its
accumulator whenever the max grows, and the merge weights splits by exp(max - top).
Unified (FlashDecoding++'s asynchronized softmax): softmax is unchanged by subtracting
any constant, so every split subtracts one per-model value phi, found by profiling
scores on calibration prompts at load time (`calibrate_unified_max`); splits then
accumulate sum(exp(s - phi) v) and sum(exp(s - phi)) with no rescaling, and the merge
just adds them. If a row's scores leave the safe window phi + [LOW, HIGH] (where fp32
could overflow or everything underflow), the merge kernel recomputes that row exactly
with the synchronized softmax in the same launch, so no host sync and no extra kernel.

Cascade (shared-prefix) attention for sample groups: forked samples share their
prompt's KV blocks. `prefix` kernel programs take one group, one KV head and one split
of the shared prefix, and attend *all* the group's queries to it with one tensor-core
matmul per tile, so the prefix is read once per group per step; the split kernel then
covers each sequence's own suffix; the merge combines both by log-sum-exp. Every entry
point has the signature of its PyTorch twin in `paged_attention`, which tests compare
against (on CPU under TRITON_INTERPRET=1, on the GPU for speed).

Sliding-window layers (Mistral, Gemma's local layers) pass `window`: each row's context
then starts at max(0, seq_len - window), in the split kernel and in the unified-max
fallback alike; a window as long as the context is full attention. The caller never
combines a window with cascade groups (see `paged_attention.paged_attention`).

8-bit KV cache (`paged_attention.FP8KVCache`): with FP8, tiles are loaded as e4m3 codes
(half the bytes of bf16, which is the point: decode at long contexts is bound by reading the
cache) plus one fp32 scale per (token, KV head), read through the scales' own strides (the
engine stores them head-major, so a tile's scales of one head are side by side). The key
scale is folded into each score column after the QK matmul (q . (c k) = c (q . k)). With
16-bit queries the fp16 path runs: q is divided by its row's largest magnitude and held in
fp16 (no overflow, 11 mantissa bits; the magnitude multiplies the scores back), codes become
fp16 at one instruction per two (converting to bf16 takes several), and the value scale is
folded into p under the synchronized softmax (p <= 1, so p x scale cannot overflow fp16;
the unified max, whose p reaches e^60, does not apply there). If that path cannot be built
on a GPU, a warning says so and the conversion path runs: codes to the query's dtype, the
value tile dequantized in fp32 (fp32 queries always take it). Splits, cascade and windows
are unchanged. Loading fp8 needs sm_89+ (the engine refuses fp8 KV on older GPUs); the
Triton interpreter handles it on CPU.

How the tiles are fed. Triton's own pipelining of these gathered loads waits for every copy
at the top of each iteration (sm_90 SASS: `DEPBAR.LE SB0, 0x0`), so a program's loads never
overlap its math. For 16-bit caches (`PREFETCH_16BIT`) the loop is therefore pipelined by hand
in registers: while one tile is computed, the next tile's K/V and the block ids of the tile
after are in flight (H100, batch 64 x 8k, synchronized softmax: 816 us against 1010; the
unified max, the engine's bf16 default, took 832.0 us Triton-pipelined in an earlier run and
has not been timed pipelined by hand). fp8 tiles are better fed by
Triton's shared-memory staging (651 against 1014 us by hand), once V is converted in the right
layout: the fp16 path loads V as int32 words of four codes, converted by PTX (`E4M3X4_TO_F16`,
`cvt.rn.f16x2.e4m3x2`) and joined back into order. Converting the codes themselves, Triton
moved them into the P.V dot's (transposed) operand layout first, one shared-memory byte load
per code; converted in the load's layout, V reaches the dot through `ldmatrix.trans` as bf16
does. In one run (H100, batch 64 x 8k, Llama-3-8B heads, synchronized softmax) the fp8
kernel takes 622.5 us (tile 32, 2 warps) against the 16-bit kernel's 1009.8 Triton-pipelined
and 816.2 hand-pipelined: 1.62x and 1.31x (before the V words, in an earlier run, fp8 took
948.5 us: 0.95x the synchronized bf16 kernel's 994.4 and 0.88x the unified one's 832.0). End to end (`benchmarks/gpu_kv_fp8.py`, batch 64 at 8k, H100) fp8 KV decodes 1.23x
faster than bf16 KV (hand-pipelined) in the same run. Under the interpreter the same words are
converted by Triton arithmetic.
"""

from __future__ import annotations

import warnings

import torch

from thinkwise.kernels import pdl
from thinkwise.kernels.device_info import sm_count, use_asm
from thinkwise.kernels.paged_attention import (  # noqa: F401  (MAX_GROUP_MEMBERS: re-exported)
    FP8_DECODE_PATHS, MAX_GROUP_MEMBERS, FP8KVCache, PrefixGroups)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch reference runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None

# The unified-max safe window (scores minus phi): within it, exp() neither overflows fp32
# when summed over a long context nor underflows to nothing; outside it, the exact fallback.
UNIFIED_WINDOW = {torch.float32: (-60.0, 60.0), torch.bfloat16: (-60.0, 60.0), torch.float16: (-8.0, 10.0)}
# fp8 caches: context positions per tile (a tile reads TILE x head_dim bytes of K and of V) and
# warps per program of the split and prefix kernels. Measured on an H100, batch 64 x 8k, Llama-3-8B
# heads, synchronized softmax (.gpu sweep, benchmarks/results/gpu_attention_fp8_sweep_h100.json):
# tile 32 with 2 warps 622.5 us, 4 warps 650.9, 8 warps 1036.9; tile 64 / 4 warps 800.7; tile 16
# 1022.2. The knob sweep then tried tile 64 with 2 warps: 424.4 us against tile 32's 622.1 (and
# 1.66x bf16 KV end to end, benchmarks/results/gpu_attention_knobs-h100-20261207.json,
# gpu_kv_fp8-h100-tile64-20261207.json).
FP8_TILE = 64
FP8_WARPS = 2
# Whether the split and prefix kernels pipeline their tile loop by hand, in registers
# (`_attend_tiles`), for fp8 and for 16-bit caches; otherwise Triton pipelines it through
# shared memory. Same run as above: a 16-bit cache 816.2 us by hand against 1009.8 us
# Triton's way; an fp8 cache 1013.8 us by hand against 650.9 (both tile 32, 4 warps).
FP8_PREFETCH = False
PREFETCH_16BIT = True
# Software-pipeline stages Triton gives the fp8 tile loop (None: Triton's default), and how
# many times over the split-KV grid fills the GPU (`choose_splits`). Knobs for sweeps:
# `benchmarks/gpu_attention_knobs.py` times every combination against these defaults.
# Same sweep: stages 2 424.4 us, Triton's default 430.4; splits 4 or 8 waves within 0.2%.
FP8_STAGES: int | None = 2
SPLIT_WAVES = 4

# Four e4m3 codes (one int32, lowest byte first) -> four fp16 ($0..$3), two codes an instruction.
E4M3X4_TO_F16 = """{
.reg .b16 lo, hi;
.reg .b32 a, b;
mov.b32 {lo, hi}, $4;
cvt.rn.f16x2.e4m3x2 a, lo;
cvt.rn.f16x2.e4m3x2 b, hi;
mov.b32 {$0, $1}, a;
mov.b32 {$2, $3}, b;
}"""


if HAVE_TRITON:
    _E4M3X4_TO_F16 = tl.constexpr(E4M3X4_TO_F16)

    @triton.jit
    def _fp16_queries(q, scale, F16: tl.constexpr):
        """For the fp16 path of an fp8 cache: q divided by its row's largest magnitude (so fp16
        cannot overflow, and keeps 11 mantissa bits) and the factor each score is multiplied
        by afterwards (that magnitude x the softmax scale); otherwise q and the scale as given."""
        if F16:
            q32 = q.to(tl.float32)
            magnitude = tl.maximum(tl.max(tl.abs(q32), 1), 1e-30)
            q = (q32 / magnitude[:, None]).to(tl.float16)
            row_scale = magnitude * scale
        else:
            row_scale = tl.zeros([q.shape[0]], tl.float32) + scale
        return q, row_scale

    @triton.jit
    def _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, block_ids, pos, valid, stride_kblock, stride_ktok, kv_head_offset,
                   stride_sblock, stride_stok, scale_head_offset,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, V_WORDS: tl.constexpr):
        """One tile's K and V rows (gathered through their block ids) and, for fp8, their scales.
        With V_WORDS the V codes come as int32 words of four (for `_codes_to_fp16`)."""
        d = tl.arange(0, HEAD_DIM)
        offsets = block_ids * stride_kblock + (pos % BLOCK_SIZE) * stride_ktok + kv_head_offset
        k = tl.load(k_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if V_WORDS:
            w = tl.arange(0, HEAD_DIM // 4)
            v = tl.load(v_ptr.to(tl.pointer_type(tl.int32)) + (offsets // 4)[:, None] + w[None, :],
                        mask=valid[:, None], other=0)
        else:
            v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FP8:
            scale_offsets = block_ids * stride_sblock + (pos % BLOCK_SIZE) * stride_stok + scale_head_offset
            k_scales = tl.load(ks_ptr + scale_offsets, mask=valid, other=0.0)
            v_scales = tl.load(vs_ptr + scale_offsets, mask=valid, other=0.0)
        else:  # unused
            k_scales = valid.to(tl.float32)
            v_scales = k_scales
        return k, v, k_scales, v_scales

    @triton.jit
    def _codes_to_fp16(words, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, ASM: tl.constexpr):
        """[TILE, HEAD_DIM // 4] int32 words of e4m3 codes -> [TILE, HEAD_DIM] fp16 (exact): by PTX
        (two codes an instruction) on a GPU, by Triton arithmetic under the interpreter. The
        join/reshape keeps the conversion in the load's layout: converting codes, Triton would
        instead move them into the dot's operand layout, which for V (transposed there) means
        one shared-memory byte load per code."""
        if ASM:
            h0, h1, h2, h3 = tl.inline_asm_elementwise(_E4M3X4_TO_F16, "=h,=h,=h,=h,r", [words],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=1)
        else:
            h0 = (words & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            h1 = ((words >> 8) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            h2 = ((words >> 16) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            h3 = ((words >> 24) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        # join adds the last axis: [[h0, h1], [h2, h3]] in memory order
        return tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), [TILE, HEAD_DIM])

    @triton.jit
    def _tile_update(q, row_scale, m_i, l_i, acc, k, v, k_scales, v_scales, valid, phi,
                     HEAD_DIM: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr, UNIFIED: tl.constexpr,
                     FP8: tl.constexpr, F16: tl.constexpr, V_WORDS: tl.constexpr, ASM: tl.constexpr):
        """The online softmax's step over one tile of K/V (from `_load_tile`)."""
        if FP8:  # codes -> fp16 (one instruction per two) or the query's dtype; both exact
            k = k.to(q.dtype)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if FP8:  # q . (c k) = c (q . k)
            scores = scores * k_scales[None, :]
        scores = tl.where(valid[None, :], scores * row_scale[:, None], float("-inf"))
        if FP8:
            if F16:  # the scale goes into p (p <= 1 here: synchronized softmax), codes to fp16
                if V_WORDS:
                    v = _codes_to_fp16(v, TILE, HEAD_DIM, ASM)
                else:
                    v = v.to(tl.float16)
            else:  # dequantized in fp32, then to the query's dtype (p may reach e^60 in unified mode)
                v = (v.to(tl.float32) * v_scales[:, None]).to(q.dtype)
        if UNIFIED:
            # No rescaling: every tile of every split subtracts the same phi. The max is
            # kept only to detect rows that leave the safe window.
            m_i = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - phi)
            l_i += tl.sum(p, 1)
            if IEEE:
                acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
        else:
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # A row that has seen only masked positions keeps max -inf; use 0 to avoid inf - inf.
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if F16:
                p = p * v_scales[None, :]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _attend_tiles(q, row_scale, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr, table_row_ptr, first_pos, end_pos,
                      phi, stride_kblock, stride_ktok, kv_head_offset, stride_sblock, stride_stok, scale_head_offset,
                      HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                      IEEE: tl.constexpr, UNIFIED: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr,
                      PREFETCH: tl.constexpr, V_WORDS: tl.constexpr, ASM: tl.constexpr):
        """Online softmax of queries `q` [R, D] over context positions [first_pos, end_pos);
        `row_scale` [R] multiplies each row's scores (from `_fp16_queries`).

        PREFETCH: the loop is pipelined by hand, in registers: while a tile is computed, the
        next tile's K/V and the block ids of the tile after that are already being loaded.
        (Triton's own pipelining of these gathers waits for every copy at the top of each
        iteration, so a program's loads never overlap its math.)"""
        t = tl.arange(0, TILE)
        if PREFETCH:
            pos = first_pos + t
            valid = pos < end_pos
            block_ids = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
            k, v, k_scales, v_scales = _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, block_ids, pos, valid,
                                                  stride_kblock, stride_ktok, kv_head_offset, stride_sblock,
                                                  stride_stok, scale_head_offset, HEAD_DIM, BLOCK_SIZE, FP8, V_WORDS)
            next_pos = pos + TILE
            next_valid = next_pos < end_pos
            next_ids = tl.load(table_row_ptr + next_pos // BLOCK_SIZE, mask=next_valid, other=0)
            for _ in range(first_pos, end_pos, TILE):
                k_next, v_next, ks_next, vs_next = _load_tile(
                    k_ptr, v_ptr, ks_ptr, vs_ptr, next_ids, next_pos, next_valid, stride_kblock, stride_ktok,
                    kv_head_offset, stride_sblock, stride_stok, scale_head_offset, HEAD_DIM, BLOCK_SIZE, FP8, V_WORDS)
                after_pos = next_pos + TILE
                after_valid = after_pos < end_pos
                after_ids = tl.load(table_row_ptr + after_pos // BLOCK_SIZE, mask=after_valid, other=0)
                m_i, l_i, acc = _tile_update(q, row_scale, m_i, l_i, acc, k, v, k_scales, v_scales, valid, phi,
                                             HEAD_DIM, TILE, IEEE, UNIFIED, FP8, F16, V_WORDS, ASM)
                k, v, k_scales, v_scales, valid = k_next, v_next, ks_next, vs_next, next_valid
                next_pos, next_valid, next_ids = after_pos, after_valid, after_ids
        else:
            for start in range(first_pos, end_pos, TILE):
                pos = start + t
                valid = pos < end_pos
                block_ids = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
                k, v, k_scales, v_scales = _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, block_ids, pos, valid,
                                                      stride_kblock, stride_ktok, kv_head_offset, stride_sblock,
                                                      stride_stok, scale_head_offset, HEAD_DIM, BLOCK_SIZE, FP8,
                                                      V_WORDS)
                m_i, l_i, acc = _tile_update(q, row_scale, m_i, l_i, acc, k, v, k_scales, v_scales, valid, phi,
                                             HEAD_DIM, TILE, IEEE, UNIFIED, FP8, F16, V_WORDS, ASM)
        return m_i, l_i, acc

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, starts_ptr, acc_ptr, max_ptr, sum_ptr,
        scale, phi, split_offset, window,
        stride_qb, stride_qh,
        stride_kblock, stride_ktok, stride_khead,
        stride_sblock, stride_stok, stride_shead,
        stride_tb,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr, UNIFIED: tl.constexpr,
        HAS_STARTS: tl.constexpr, HAS_WINDOW: tl.constexpr, FP8: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr,
        PREFETCH: tl.constexpr, V_WORDS: tl.constexpr, ASM: tl.constexpr,
    ):
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        # Cascade: the shared prefix [0, start) is attended by the prefix kernel.
        seq_start = tl.load(starts_ptr + b) if HAS_STARTS else 0
        if HAS_WINDOW:  # sliding window: only the last `window` positions
            seq_start = tl.maximum(seq_start, seq_len - window)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        head_ok = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
        q, row_scale = _fp16_queries(q, scale, F16)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        # Each row divides its own context among the splits, so padding the grid for a
        # longer bucket (CUDA graphs) or a longer neighbour costs no parallelism.
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len - seq_start, TILE), tl.num_programs(2))
        first = seq_start + split * tiles_per_split * TILE
        last = tl.minimum(first + tiles_per_split * TILE, seq_len)
        m_i, l_i, acc = _attend_tiles(q, row_scale, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr,
                                      tables_ptr + b * stride_tb, first, last, phi, stride_kblock, stride_ktok,
                                      kv_head * stride_khead, stride_sblock, stride_stok, kv_head * stride_shead,
                                      HEAD_DIM, BLOCK_SIZE, TILE, IEEE, UNIFIED, FP8, F16, PREFETCH, V_WORDS, ASM)
        slot = split_offset + split
        out = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + slot * stride_as + d[None, :]
        tl.store(out, acc, mask=head_ok[:, None])
        tl.store(max_ptr + b * stride_mb + heads * stride_mh + slot, m_i, mask=head_ok)
        tl.store(sum_ptr + b * stride_mb + heads * stride_mh + slot, l_i, mask=head_ok)

    @triton.jit
    def _prefix_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, group_rows_ptr, group_lens_ptr, acc_ptr, max_ptr, sum_ptr,
        scale, phi,
        stride_qb, stride_qh,
        stride_kblock, stride_ktok, stride_khead,
        stride_sblock, stride_stok, stride_shead,
        stride_tb, stride_gr,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, MEMBERS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr, UNIFIED: tl.constexpr,
        FP8: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, V_WORDS: tl.constexpr,
        ASM: tl.constexpr,
    ):
        """All queries of one sample group against its shared prefix: one read of the prefix."""
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        group_id = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        prefix_len = tl.load(group_lens_ptr + group_id)
        i = tl.arange(0, MEMBERS * GROUP_PAD)
        member = i // GROUP_PAD
        head = kv_head * GROUP + i % GROUP_PAD
        rows = tl.load(group_rows_ptr + group_id * stride_gr + member)
        ok = (rows >= 0) & (i % GROUP_PAD < GROUP)
        rows = tl.where(ok, rows, 0)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + rows[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :], mask=ok[:, None],
                    other=0.0)
        q, row_scale = _fp16_queries(q, scale, F16)
        m_i = tl.full([MEMBERS * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([MEMBERS * GROUP_PAD], tl.float32)
        acc = tl.zeros([MEMBERS * GROUP_PAD, HEAD_DIM], tl.float32)
        tiles_per_split = tl.cdiv(tl.cdiv(prefix_len, TILE), tl.num_programs(2))
        first = split * tiles_per_split * TILE
        last = tl.minimum(first + tiles_per_split * TILE, prefix_len)
        # Every member's table starts with the same prefix blocks; read them through the first.
        first_row = tl.load(group_rows_ptr + group_id * stride_gr)
        m_i, l_i, acc = _attend_tiles(q, row_scale, m_i, l_i, acc, k_ptr, v_ptr, ks_ptr, vs_ptr,
                                      tables_ptr + first_row * stride_tb, first, last, phi, stride_kblock, stride_ktok,
                                      kv_head * stride_khead, stride_sblock, stride_stok, kv_head * stride_shead,
                                      HEAD_DIM, BLOCK_SIZE, TILE, IEEE, UNIFIED, FP8, F16, PREFETCH, V_WORDS, ASM)
        out = acc_ptr + rows[:, None] * stride_ab + head[:, None] * stride_ah + split * stride_as + d[None, :]
        tl.store(out, acc, mask=ok[:, None])
        tl.store(max_ptr + rows * stride_mb + head * stride_mh + split, m_i, mask=ok)
        tl.store(sum_ptr + rows * stride_mb + head * stride_mh + split, l_i, mask=ok)

    @triton.jit
    def _merge_splits_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, num_splits, num_prefix_splits, starts_ptr, flags_ptr,
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, scale, phi, window_low, window_high, window,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ob, stride_oh,
        stride_qb, stride_qh, stride_kblock, stride_ktok, stride_khead, stride_sblock, stride_stok, stride_shead,
        stride_tb,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr, UNIFIED: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        FP8: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        used = s < num_splits
        if HAS_STARTS:
            # Prefix partials exist only for rows in a sample group (start > 0).
            first_used = tl.where(tl.load(starts_ptr + b) > 0, 0, num_prefix_splits)
            used = used & (s >= first_used)
        m = tl.load(max_ptr + b * stride_mb + h * stride_mh + s, mask=used, other=float("-inf"))
        l = tl.load(sum_ptr + b * stride_mb + h * stride_mh + s, mask=used, other=0.0)
        acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + s[:, None] * stride_as + d[None, :],
                      mask=used[:, None], other=0.0)
        top = tl.max(m, 0)
        if UNIFIED:
            out = tl.sum(acc, 0) / tl.sum(l, 0)
            escaped = (top - phi > window_high) | (top - phi < window_low)
            tl.store(flags_ptr + b * tl.num_programs(1) + h, escaped.to(tl.int32))
            if escaped:
                # Exact fallback for this row: the synchronized online softmax over its whole
                # context (one query row, so plain multiply-adds instead of a matmul).
                seq_len = tl.load(lens_ptr + b)
                first_pos = 0
                if HAS_WINDOW:
                    first_pos = tl.maximum(seq_len - window, 0)
                q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32)
                t = tl.arange(0, TILE)
                kv_offset = (h // GROUP) * stride_khead
                m_run = tl.max(tl.full([TILE], float("-inf"), tl.float32), 0)
                l_run = tl.sum(tl.zeros([TILE], tl.float32), 0)
                acc_run = tl.zeros([HEAD_DIM], tl.float32)
                for start in range(first_pos, seq_len, TILE):
                    pos = start + t
                    valid = pos < seq_len
                    block_ids = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
                    offsets = block_ids * stride_kblock + (pos % BLOCK_SIZE) * stride_ktok + kv_offset
                    scale_offsets = block_ids * stride_sblock + (pos % BLOCK_SIZE) * stride_stok + \
                        (h // GROUP) * stride_shead
                    k = tl.load(k_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                    if FP8:
                        k = k * tl.load(ks_ptr + scale_offsets, mask=valid, other=0.0)[:, None]
                    scores = tl.where(valid, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
                    m_new = tl.maximum(m_run, tl.max(scores, 0))
                    p = tl.exp(scores - m_new)
                    alpha = tl.exp(m_run - m_new)
                    v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
                    if FP8:
                        v = v * tl.load(vs_ptr + scale_offsets, mask=valid, other=0.0)[:, None]
                    l_run = l_run * alpha + tl.sum(p, 0)
                    acc_run = acc_run * alpha + tl.sum(p[:, None] * v, 0)
                    m_run = m_new
                out = acc_run / l_run
        else:
            weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
            total = tl.sum(l * weight, 0)
            out = tl.sum(acc * weight[:, None], 0) / total
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _next_power_of_two(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def choose_splits(batch: int, num_kv_heads: int, num_tiles: int, device: torch.device) -> int:
    """Enough splits that batch x kv_heads x splits fills the GPU about SPLIT_WAVES (4) times (several
    programs per SM keep loads in flight). Short contexts get one tile per split: a
    program's tiles are sequential, so fewer, longer splits would only add latency."""
    wanted = max(1, (SPLIT_WAVES * sm_count(device)) // max(1, batch * num_kv_heads))
    return max(1, min(wanted, num_tiles, 64))


def triton_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    unified_max: float | None = None,
    prefix: PrefixGroups | None = None,
    window: int | None = None,
    fallback_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention.decode_attention`: query [B, H, D] -> [B, H, D].

    `unified_max` switches to FlashDecoding++'s unified-max softmax (exact fallback per
    row); `prefix` adds cascade attention over shared prefixes; `fallback_flags` ([B, H]
    int32), if given, receives 1 for the rows that took the fallback (for tests/stats).
    `window`: a sliding-window layer's window (not combinable with `prefix`). The caches
    may be `FP8KVCache`s (e4m3 codes and per-slot scales).
    """
    if isinstance(k_cache, FP8KVCache) and query.dtype in (torch.bfloat16, torch.float16) \
            and _fp16_path_failure is None:
        try:
            return _decode(query, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, unified_max,
                           prefix, window, fallback_flags, f16=True)
        except (ValueError, torch.OutOfMemoryError):
            raise  # bad arguments or no memory: the other path would fail the same way
        except Exception as error:  # noqa: BLE001 - a compiler or launch failure of the fp16 path
            _record_fp16_failure(error)
    return _decode(query, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, unified_max, prefix,
                   window, fallback_flags, f16=False)


# Why the fp16 path of the fp8 kernels could not run here (then 16-bit queries on an fp8 cache
# take the conversion path, as fp32 queries do), or None.
_fp16_path_failure: str | None = None


def _record_fp16_failure(error: Exception) -> None:
    global _fp16_path_failure
    _fp16_path_failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    FP8_DECODE_PATHS["16-bit queries"] = f"conversion path (the fp16 path failed: {_fp16_path_failure})"
    warnings.warn(f"the fp16 path of the fp8 KV decode kernel failed ({_fp16_path_failure}); fp8 decode "
                  "attention converts codes to the query's dtype from now on (same results, slower)",
                  RuntimeWarning, stacklevel=3)


def _decode(query, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, unified_max, prefix, window,
            fallback_flags, f16: bool) -> torch.Tensor:
    """`triton_decode_attention`'s launches; `f16`: an fp8 cache with 16-bit queries takes the
    fp16 path (codes to fp16, one instruction per two), whose synchronized softmax keeps
    p <= 1 for fp16, so the unified max does not apply there."""
    if window is not None and prefix is not None:
        raise ValueError("a sliding window cannot be combined with cascade prefix groups")
    fp8 = isinstance(k_cache, FP8KVCache)
    if fp8:  # codes and scales travel separately, the scales with strides of their own
        k_scales, v_scales = k_cache.scales, v_cache.scales
        k_cache, v_cache = k_cache.codes, v_cache.codes
        if k_scales.shape != k_cache.shape[:3] or v_scales.shape != v_cache.shape[:3] \
                or k_scales.stride() != v_scales.stride():
            raise ValueError("fp8 KV cache layout: K and V scales must be [blocks, block_size, kv_heads] "
                             "with the same strides")
        scale_strides = k_scales.stride()
    else:
        k_scales, v_scales = k_cache, v_cache  # unused pointers
        scale_strides = (0, 0, 0)
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = max(16, _next_power_of_two(group))
    # Positions per tile: 16 (FP8_TILE for fp8) or a whole block.
    tile = max(FP8_TILE if fp8 else 16, block_size)
    device = query.device
    unified = unified_max is not None and not f16
    if fallback_flags is not None and not unified:
        fallback_flags.zero_()  # no row falls back without the unified max
    phi = float(unified_max) if unified else 0.0
    low, high = UNIFIED_WINDOW.get(query.dtype, (-8.0, 10.0))
    ieee = query.dtype == torch.float32
    query = query.contiguous()
    tables = block_tables[:batch]
    launch = pdl.kernel_args(device, batch)
    prefetch = FP8_PREFETCH if fp8 else PREFETCH_16BIT
    # The split and prefix kernels; a hand-pipelined loop needs no stages of Triton's.
    # V as int32 words needs 4-byte-aligned rows: a base and strides the word loads can divide.
    v_words = f16 and v_cache.data_ptr() % 4 == 0 and all(stride % 4 == 0 for stride in k_cache.stride()[:3]) \
        and head_dim % 4 == 0
    stages = 1 if prefetch else (FP8_STAGES if fp8 else None)
    tile_launch = dict(launch, num_warps=FP8_WARPS if fp8 else 4, PREFETCH=prefetch,
                       V_WORDS=v_words, ASM=use_asm(device), **({"num_stages": stages} if stages else {}))

    num_prefix_splits = 0
    if prefix is not None:
        # Sized as if there were one group (the usual case; padded groups of a CUDA graph
        # exit at once), so a single group's prefix still spreads over the whole GPU.
        prefix_tiles = max(1, (prefix.max_prefix_len + tile - 1) // tile)
        num_prefix_splits = choose_splits(1, num_kv_heads, prefix_tiles, device)
    context_tiles = max(1, (max_seq_len + tile - 1) // tile)
    splits = choose_splits(batch, num_kv_heads, context_tiles, device)
    total_splits = num_prefix_splits + splits
    acc = torch.empty(batch, num_heads, total_splits, head_dim, dtype=torch.float32, device=device)
    maxes = torch.empty(batch, num_heads, total_splits, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxes)
    starts = prefix.row_starts if prefix is not None else seq_lens  # a dummy pointer when unused
    if prefix is not None:
        members = prefix.rows.shape[1]
        _prefix_kernel[(prefix.rows.shape[0], num_kv_heads, num_prefix_splits)](
            query, k_cache, v_cache, k_scales, v_scales, tables, prefix.rows, prefix.prefix_lens, acc, maxes, sums,
            scale, phi,
            query.stride(0), query.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
            tables.stride(0), prefix.rows.stride(0),
            acc.stride(0), acc.stride(1), acc.stride(2),
            maxes.stride(0), maxes.stride(1),
            GROUP=group, GROUP_PAD=_next_power_of_two(group), MEMBERS=members, HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size, TILE=tile, IEEE=ieee, UNIFIED=unified, FP8=fp8, F16=f16, **tile_launch,
        )
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        query, k_cache, v_cache, k_scales, v_scales, tables, seq_lens, starts, acc, maxes, sums,
        scale, phi, num_prefix_splits, window or 0,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
        tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile, IEEE=ieee, UNIFIED=unified, HAS_STARTS=prefix is not None,
        HAS_WINDOW=window is not None, FP8=fp8, F16=f16, **tile_launch,
    )
    out = torch.empty_like(query)
    flags = fallback_flags
    if flags is None:  # the merge writes flags only in unified mode; otherwise any pointer will do
        flags = torch.empty(batch, num_heads, dtype=torch.int32, device=device) if unified else maxes
    _merge_splits_kernel[(batch, num_heads)](
        acc, maxes, sums, out, total_splits, num_prefix_splits, starts, flags,
        query, k_cache, v_cache, k_scales, v_scales, tables, seq_lens, scale, phi, low, high, window or 0,
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1), out.stride(0), out.stride(1),
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides,
        tables.stride(0), GROUP=group, HEAD_DIM=head_dim, SPLITS_PAD=max(2, _next_power_of_two(total_splits)),
        BLOCK_SIZE=block_size,
        TILE=tile, UNIFIED=unified, HAS_STARTS=prefix is not None, HAS_WINDOW=window is not None, FP8=fp8,
        **launch,
    )
    return out
