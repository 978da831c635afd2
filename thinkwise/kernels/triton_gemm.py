"""Flat GEMM for decode in Triton: y = x @ W.T + b for few rows of x, memory-bound by design.

A decode step multiplies M = 1..64 token rows by every weight matrix; with so few rows
the work is reading W [N, K] (bf16, as nn.Linear stores it) from HBM once, and the
arithmetic is nearly free (M flops per byte, far under an H100's ~300). So each program
owns a tile of N output columns for all M rows and streams its rows of W along K with
16-byte loads, pipelined `num_stages` deep. Two inner products: `dot` computes
W_tile @ x_tile.T on the tensor cores (W is the big operand, x is padded to 16 rows, the
FlashDecoding++ "flat GEMM" with M padded to a small multiple instead of 64); `gemv`
multiplies and adds on CUDA cores into one [N, K] register tile per row and reduces them
once after the loop (for 1..4 rows, FlashDecoding++'s GEMV), keeping `prefetch` tiles of
W in flight, the first ones loaded before PDL's wait for x. When N is small, N tiles alone
cannot fill 132 SMs, so K may be split across programs (split-K): every split writes its
fp32 partial to a workspace, bumps a per-tile arrival counter, and the last program to
arrive sums the partials in a fixed order, adds the bias, writes the output and re-arms
the counter, all in the one launch (no memset, no second kernel, deterministic sums).
For the fused [gate; up] projection the epilogue can apply SiLU(gate) * up itself: each
program then reads matching gate and up rows (no re-laid-out weights) and writes the
activation, which saves the MLP's element-wise kernel. (A residual add + RMSNorm epilogue,
the last tile of a row normalising it after an arrival counter, was measured slower than
the separate norm kernel under PDL, 960 vs 915 us a Qwen3-0.6B graph replay, and dropped.)
The twin is `torch.nn.functional.linear`; `LinearDispatcher`'s GPU sibling in
`linear_dispatch` decides per weight shape and M which of the two runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkwise.kernels import pdl
from thinkwise.kernels.device_info import sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None

DOT_MIN_ROWS = 16  # tl.dot needs every dimension >= 16: fewer rows are padded (masked loads)
MAX_SPLIT_K = 32
GEMV_MAX_ROWS = 4  # the gemv program keeps one accumulator per row, written out for up to 4
EPILOGUE_NONE, EPILOGUE_SILU_MUL = 0, 1  # what a program does with its finished tile


@dataclass(frozen=True)
class FlatGemmConfig:
    """One tiling of the kernel. `split_k` 0 chooses the split so the launch has about
    `programs_per_sm` programs per SM; `block_k` of a gemv config is for one row and
    shrinks as rows grow, to keep the per-row register tiles the same size in all."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True
    split_k: int = 0
    programs_per_sm: int = 2
    max_rows: int = 64  # the largest M this config is offered for
    prefetch: int = 1  # gemv: W tiles in flight (loaded ahead, the first ones before PDL's wait)

    @property
    def name(self) -> str:
        kind = "dot" if self.use_dot else "gemv"
        split = f"_sk{self.split_k}" if self.split_k else ("" if self.programs_per_sm == 2 else f"_p{self.programs_per_sm}")
        ahead = f"_pf{self.prefetch}" if self.prefetch != 1 else ""
        return f"{kind}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}{split}{ahead}"

    def block_m(self, rows: int) -> int:
        rows_pow2 = triton_next_power_of_2(max(rows, 1))
        if self.use_dot:
            return min(max(DOT_MIN_ROWS, rows_pow2), 64)
        return min(rows_pow2, self.max_rows, GEMV_MAX_ROWS)

    def k_block(self, rows: int) -> int:
        if self.use_dot:
            return self.block_k
        return max(16, self.block_k // self.block_m(rows))


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# The configs the start-up profile tries: CUDA-core GEMVs for 1..4 rows, two tensor-core
# tilings (narrow tiles for more programs, wide tiles for fewer, longer ones). The GEMVs
# differ in how they cover a small matrix (H100, Qwen3-0.6B batch 1, each call after an
# RMSNorm, from the start-up profile): 16-row tiles with two W tiles in flight suit
# qkv (4096x1024, 5.0 us vs cuBLAS 6.8); 4-row tiles over the whole K with no split-K suit
# the N=1024 matrices, where 16-row tiles leave too few programs and splitting K adds an
# arrival round trip (o_proj 1024x2048: 4.1 us vs 5.1 split; down 1024x3072: 4.9 vs 6.4).
DEFAULT_CONFIGS: tuple[FlatGemmConfig, ...] = (
    FlatGemmConfig(block_n=16, block_k=512, num_warps=4, num_stages=3, use_dot=False, max_rows=4),
    FlatGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=4),
    FlatGemmConfig(block_n=128, block_k=128, num_warps=4, num_stages=3),
    FlatGemmConfig(block_n=16, block_k=512, num_warps=4, num_stages=3, use_dot=False, max_rows=4, prefetch=2),
    FlatGemmConfig(block_n=8, block_k=512, num_warps=4, num_stages=3, use_dot=False, max_rows=4, prefetch=2),
    FlatGemmConfig(block_n=4, block_k=2048, num_warps=4, num_stages=3, use_dot=False, max_rows=4, split_k=1),
    FlatGemmConfig(block_n=4, block_k=1024, num_warps=4, num_stages=3, use_dot=False, max_rows=4, split_k=1, prefetch=2),
)


class SplitKWorkspace:
    """fp32 partials [split, M, N] and zeroed int32 arrival counters, shared by every
    layer on one device. Launches on one stream run one after another, and each leaves
    the counters at zero, so one workspace serves all layers and CUDA-graph replays."""

    def __init__(self, device: torch.device | str, partial_numel: int, counter_numel: int):
        self.partials = torch.empty(max(partial_numel, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(counter_numel, 1), dtype=torch.int32, device=device)

    def fits(self, partial_numel: int, counter_numel: int) -> bool:
        return partial_numel <= self.partials.numel() and counter_numel <= self.counters.numel()


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int
    block_k: int
    m_tiles: int
    n_tiles: int
    split_k: int
    k_per_split: int  # a multiple of block_k




def plan_launch(rows: int, n: int, k: int, config: FlatGemmConfig, device: torch.device) -> LaunchPlan:
    """Grid and split for one call; depends only on shapes, so CUDA-graph safe."""
    block_m = config.block_m(rows)
    block_k = config.k_block(rows)
    m_tiles = -(-rows // block_m)
    n_tiles = -(-n // config.block_n)
    k_iters = -(-k // block_k)
    split = config.split_k or max(1, sm_count(device) * config.programs_per_sm // (m_tiles * n_tiles))
    split = max(1, min(split, k_iters, MAX_SPLIT_K))
    iters = -(-k_iters // split)
    split = -(-k_iters // iters)  # no empty splits
    return LaunchPlan(block_m, block_k, m_tiles, n_tiles, split, iters * block_k)


def workspace_size(rows: int, n: int, k: int, config: FlatGemmConfig, device: torch.device) -> tuple[int, int]:
    """(partial floats, counters) a call needs; (0, 0) without split-K."""
    plan = plan_launch(rows, n, k, config, device)
    if plan.split_k == 1:
        return 0, 0
    return plan.split_k * rows * n, plan.m_tiles * plan.n_tiles


if HAVE_TRITON:

    @triton.jit
    def store_tile(total, offs_m, pid_n, M, N, out_ptr, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr):
        """Store a finished [BLOCK_M, BLOCK_N] fp32 tile (bias already added), rounding where
        the unfused kernels round: the GEMM output to its dtype first, then as fused.py does."""
        dtype = out_ptr.dtype.element_ty
        row_ok = (offs_m < M)[:, None]
        if EPILOGUE == 1:  # SiLU(gate) * up: this tile's first half holds gate rows, its second the matching up rows
            HALF: tl.constexpr = BLOCK_N // 2
            rounded = total.to(dtype).to(tl.float32)
            gate, up = tl.split(tl.permute(tl.reshape(rounded, [BLOCK_M, 2, HALF]), (0, 2, 1)))
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            cols = pid_n * HALF + tl.arange(0, HALF)
            tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], (silu * up).to(dtype),
                     mask=row_ok & (cols < N // 2)[None, :])
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(dtype),
                     mask=row_ok & (offs_n < N)[None, :])

    @triton.jit
    def tile_rows(pid_n, N, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr):
        """The weight rows program `pid_n` reads, int64. Plain: BLOCK_N consecutive rows, wrapped
        (out-of-range rows read a valid row; never stored). SiLU * up: BLOCK_N / 2 gate rows and
        the matching up rows, N / 2 further down (the callers check that the halves split into whole tiles)."""
        lane = tl.arange(0, BLOCK_N)
        if EPILOGUE == 1:
            HALF: tl.constexpr = BLOCK_N // 2
            rows = pid_n * HALF + lane % HALF + (lane // HALF) * (N // 2)
        else:
            rows = (pid_n * BLOCK_N + lane) % N
        return rows.to(tl.int64)

    @triton.jit
    def store_row(result, row, pid_n, M, N, out_ptr, stride_om, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr):
        """`store_tile` for a GEMV's one token row (`result` [BLOCK_N] fp32, rows as
        `tile_rows` read them, bias added)."""
        store_tile(tl.reshape(result, [1, BLOCK_N]), row + tl.zeros([1], dtype=tl.int32), pid_n, M, N, out_ptr,
                   stride_om, 1, BLOCK_N, EPILOGUE)

    @triton.jit
    def finish_tile(result, offs_m, pid_m, pid_n, pid_k, M, N, split_k, rows, bias_ptr, out_ptr, stride_om,
                    partial_ptr, counter_ptr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    EPILOGUE: tl.constexpr):
        """A program's fp32 [BLOCK_M, BLOCK_N] result (weight rows `rows`, as `tile_rows` gives them)
        to the output: stored at once (plus bias) without split-K; with it, stored as this slice's
        partial, and the last of the tile's split_k programs to arrive (a `SplitKWorkspace`
        counter) sums the slices in a fixed order (the same bits every run, unlike atomic adds),
        adds the bias, re-arms the counter and stores: no second kernel."""
        if split_k == 1:
            if HAS_BIAS:
                result += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
            store_tile(result, offs_m, pid_n, M, N, out_ptr, stride_om, BLOCK_M, BLOCK_N, EPILOGUE)
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the partials' columns
            out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            tile_offsets = offs_m[:, None] * N + offs_n[None, :]
            tl.store(partial_ptr + pid_k * M * N + tile_offsets, result, mask=out_mask)
            # Every thread's partial store must be done before the arrival is published;
            # the counter's acq_rel makes the others' partials visible to the last arrival.
            tl.debug_barrier()
            counter = counter_ptr + pid_m * tl.num_programs(1) + pid_n
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == split_k - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in range(0, split_k):  # fixed order: the same sum on every run
                    total += tl.load(partial_ptr + s * M * N + tile_offsets, mask=out_mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
                tl.atomic_xchg(counter, 0)  # re-arm for the next launch
                store_tile(total, offs_m, pid_n, M, N, out_ptr, stride_om, BLOCK_M, BLOCK_N, EPILOGUE)

    # M and split_k vary per call; specializing on them (M == 1, M % 16 == 0, split_k == 1)
    # would compile several copies of each tiling for no gain: rows are never vectorised along.
    @triton.jit(do_not_specialize=["M", "split_k"])
    def _flat_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                          M, N, K, stride_xm, stride_wn, stride_om, k_per_split, split_k,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, EPILOGUE: tl.constexpr, PREFETCH: tl.constexpr,
                          PDL: tl.constexpr):
        pid_m = tl.program_id(0)  # fastest: the M tiles of one N tile run together and share W in L2
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        # Out-of-range rows and columns read a valid row instead (wrapped), so loads need
        # no row/column masks; their results are never stored.
        safe_m = offs_m % M
        safe_n = tile_rows(pid_n, N, BLOCK_N, EPILOGUE)  # SiLU * up: gate rows, then the same up rows
        w_rows = safe_n * stride_wn  # int64: vocab x hidden can pass 2**31 elements
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        offs_k = tl.arange(0, BLOCK_K)
        if USE_DOT:
            if PDL:  # x is the previous kernel's output: wait for it; then let the next kernel launch
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            w_ptrs = w_ptr + w_rows[:, None] + (k_start + offs_k)[None, :]
            x_ptrs = x_ptr + safe_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
            for k in range(k_start, k_end, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs)
                    x = tl.load(x_ptrs)
                else:
                    k_ok = (k + offs_k) < k_end
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                    x = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
                if IEEE:
                    acc = tl.dot(w, x, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, x, acc)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
            result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        else:
            # One [BLOCK_N, BLOCK_K] fp32 accumulator per row (up to 4, so each is its own
            # loop-carried tensor in W's load layout): element-wise FMAs only in the loop, one
            # cross-thread reduction after it. W's next tile is loaded before this one's FMAs
            # (register double-buffering), since the pipeliner only stages loads feeding a dot.
            acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            row0 = pid_m * BLOCK_M
            # x rows are read as [BLOCK_N, BLOCK_K] tiles with a zero stride along N: the same
            # shape and contiguity as W's, so they load straight into W's register layout (the
            # repeats hit L1) instead of a shared-memory layout conversion every step.
            x_tile = tl.zeros([BLOCK_N, 1], dtype=tl.int32) + (k_start + offs_k)[None, :]
            x0_ptrs = x_ptr + (row0 % M) * stride_xm + x_tile
            x1_ptrs = x_ptr + ((row0 + 1) % M) * stride_xm + x_tile
            x2_ptrs = x_ptr + ((row0 + 2) % M) * stride_xm + x_tile
            x3_ptrs = x_ptr + ((row0 + 3) % M) * stride_xm + x_tile
            w_ptrs = w_ptr + w_rows[:, None] + (k_start + offs_k)[None, :]
            if EVEN_K:
                w_next = tl.load(w_ptrs)
            else:
                w_next = tl.load(w_ptrs, mask=((k_start + offs_k) < k_end)[None, :], other=0.0)
            if PREFETCH > 1:  # a second tile in flight too (masked where the split has one tile)
                w_after = tl.load(w_ptrs + BLOCK_K, mask=((k_start + BLOCK_K + offs_k) < k_end)[None, :], other=0.0)
            # PDL (kernels/pdl.py): W's first tile(s) are loaded before waiting for the previous
            # kernel, whose output x is; so the fetch overlaps that kernel's tail.
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            for k in range(k_start, k_end, BLOCK_K):
                w = w_next.to(tl.float32)
                w_ptrs += BLOCK_K
                # Masked past the split's end (the last tile of W's last row has nothing after it).
                if PREFETCH > 1:
                    w_next = w_after
                    w_after = tl.load(w_ptrs + BLOCK_K, mask=((k + 2 * BLOCK_K + offs_k) < k_end)[None, :], other=0.0)
                else:
                    w_next = tl.load(w_ptrs, mask=((k + BLOCK_K + offs_k) < k_end)[None, :], other=0.0)
                k_ok = ((k + offs_k) < k_end)[None, :]
                acc0 += w * tl.load(x0_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                if BLOCK_M > 1:
                    acc1 += w * tl.load(x1_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                if BLOCK_M > 2:
                    acc2 += w * tl.load(x2_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                    acc3 += w * tl.load(x3_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                x0_ptrs += BLOCK_K
                x1_ptrs += BLOCK_K
                x2_ptrs += BLOCK_K
                x3_ptrs += BLOCK_K
            which = tl.arange(0, BLOCK_M)[:, None]
            result = tl.where(which == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
            if BLOCK_M > 1:
                result = tl.where(which == 1, tl.sum(acc1, axis=1)[None, :], result)
            if BLOCK_M > 2:
                result = tl.where(which == 2, tl.sum(acc2, axis=1)[None, :], result)
                result = tl.where(which == 3, tl.sum(acc3, axis=1)[None, :], result)
        finish_tile(result, offs_m, pid_m, pid_n, pid_k, M, N, split_k, safe_n, bias_ptr, out_ptr, stride_om,
                    partial_ptr, counter_ptr, HAS_BIAS, BLOCK_M, BLOCK_N, EPILOGUE)


def triton_flat_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     config: FlatGemmConfig = DEFAULT_CONFIGS[1],
                     workspace: SplitKWorkspace | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the flat-GEMM kernel: x [..., K], weight [N, K].

    Without a workspace big enough, split-K calls allocate a fresh one (a memset more per
    call; inside CUDA-graph capture it becomes part of the graph, so still correct).
    """
    x2, weight, lead = _prepare(x, weight)
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, out, config, workspace, EPILOGUE_NONE)
    return out.reshape(*lead, weight.shape[0])


def can_fuse_silu_mul(n: int, config: FlatGemmConfig) -> bool:
    """A tile holds BLOCK_N / 2 gate rows and the matching up rows, so each half of the
    [gate; up] weight must split into whole tiles."""
    return n % 2 == 0 and (n // 2) % (config.block_n // 2) == 0


def triton_flat_gemm_silu_mul(x: torch.Tensor, weight: torch.Tensor, config: FlatGemmConfig,
                              workspace: SplitKWorkspace | None = None) -> torch.Tensor:
    """`silu_mul(F.linear(x, weight))` in one launch, weight the fused [gate; up] projection
    [2 I, K]: each program reads matching gate and up rows and stores SiLU(gate) * up [.., I]."""
    n = weight.shape[0]
    if not can_fuse_silu_mul(n, config):
        raise ValueError(f"a [gate; up] weight of {n} rows does not split into {config.block_n // 2}-row tiles")
    x2, weight, lead = _prepare(x, weight)
    out = torch.empty(x2.shape[0], n // 2, dtype=x.dtype, device=x.device)
    _launch(x2, weight, None, out, config, workspace, EPILOGUE_SILU_MUL)
    return out.reshape(*lead, n // 2)



def _prepare(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use torch.nn.functional.linear")
    k = weight.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return x2, weight, x.shape[:-1]


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            config: FlatGemmConfig, workspace: SplitKWorkspace | None, epilogue: int) -> None:
    rows = x2.shape[0]
    n, k = weight.shape
    if rows == 0:
        return
    plan = plan_launch(rows, n, k, config, x2.device)
    # Unused when split_k == 1, but the split-K branch is still compiled, so the placeholders
    # must have the real pointer types (an int32 counter: atomics reject a bf16 one).
    partials, counters = split_k_placeholders(x2.device)
    if plan.split_k > 1:
        need = (plan.split_k * rows * n, plan.m_tiles * plan.n_tiles)
        if workspace is None or not workspace.fits(*need):
            workspace = SplitKWorkspace(x2.device, *need)
        partials, counters = workspace.partials, workspace.counters
    grid = (plan.m_tiles, plan.n_tiles, plan.split_k)
    _flat_gemm_kernel[grid](
        x2, weight, bias if bias is not None else out, out, partials, counters,
        rows, n, k, x2.stride(0), weight.stride(0), out.stride(0), plan.k_per_split, plan.split_k,
        BLOCK_M=plan.block_m, BLOCK_N=config.block_n, BLOCK_K=plan.block_k, USE_DOT=config.use_dot,
        EVEN_K=k % plan.block_k == 0, HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32,
        EPILOGUE=epilogue, PREFETCH=config.prefetch,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.kernel_args(x2.device, rows),
    )


_PLACEHOLDERS: dict = {}


def split_k_placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Typed stand-ins (fp32 partials, int32 counters) for a call without split-K."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (torch.zeros(1, dtype=torch.float32, device=device),
                              torch.zeros(1, dtype=torch.int32, device=device))
    return _PLACEHOLDERS[key]
