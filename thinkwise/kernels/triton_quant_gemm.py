"""Weight-only int8 / int4 GEMV and flat GEMM in Triton, dequantizing inside the kernel.

Decode reads every weight once per step, so storing W in 8 or 4 bits instead of 16 cuts
the bytes a step moves by 2x or ~3.5x, and the time with it, as long as the kernel streams
the codes straight from HBM and dequantizes in registers (never writing a 16-bit copy).
Layouts: int8 is `q` [N, K] int8 with one scale per output row (w = q * s, the scale
applied once to the finished dot product); int4 is `q` [N, K/2] uint8, two codes per byte
(low nibble = even k), with a scale and a zero point per row and group of `group` inputs
(w = (code - 8) * s + z, gpt-fast's and PyTorch's int4 convention). Each program owns
BLOCK_N output rows for BLOCK_M token rows and walks K in BLOCK_K steps: `dot` tiles run
the dequantized [BLOCK_N, BLOCK_K] tile against x on the tensor cores (M padded to 16,
FlashDecoding++'s flat GEMM), `gemv` tiles multiply and add on CUDA cores for 1..4 rows.
For one token row the int4 GEMV does not dequantize each weight: it sums codes x inputs per
group (even inputs against low nibbles, odd against high) and scales once per group. Weight
tiles are streamed one ahead of their use; under PDL (`pdl`) the first is loaded before the
wait for the previous kernel, whose output x is, as the 16-bit flat GEMM does. The twin is
`quant_gemm_reference` (dequantize, then `F.linear`); the dispatch table in
`linear_dispatch` times these tilings against dequantize-then-cuBLAS per shape and M.
Measured on an H100 (benchmarks/results/gpu_throughput_quantization_h100.json): Llama-3-8B
shape batch 1 int8 1.08x and int4 1.24x bf16, the int4 GEMV at ~1.3 TB/s on 28672x4096
(51 us; the roofline is ~20 us); batch 64 0.56x / 0.46x, because the dot tiles have no
split-K and too few programs on long-K shapes. Split-K and wider loads are the next steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkwise.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch twin runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None
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

    @property
    def name(self) -> str:
        return f"{'dot' if self.use_dot else 'gemv'}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    def block_m(self, rows: int) -> int:
        rows_pow2 = 1 << (max(rows, 1) - 1).bit_length()
        if self.use_dot:
            return min(max(DOT_MIN_ROWS, rows_pow2), 64)
        return min(rows_pow2, GEMV_MAX_ROWS)


# Offered to the start-up profile: CUDA-core GEMVs for 1..4 rows (narrow tiles: with few
# output rows per program, small matrices still spread over all SMs), tensor-core tiles for
# more rows, and a wide dot tile for prefill-sized M (compared there against dequantize +
# cuBLAS). Hopper wants >= 16-byte loads per thread: a 16 x 256 int4 tile is 2 KiB.
DEFAULT_CONFIGS: tuple[QuantGemmConfig, ...] = (
    QuantGemmConfig(block_n=16, block_k=256, num_warps=4, num_stages=3, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=8, block_k=512, num_warps=4, num_stages=3, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=4, block_k=1024, num_warps=4, num_stages=3, use_dot=False, max_rows=2),
    QuantGemmConfig(block_n=32, block_k=256, num_warps=8, num_stages=3, use_dot=False, max_rows=2),
    QuantGemmConfig(block_n=32, block_k=128, num_warps=4, num_stages=4),  # more programs for small N, long K
    QuantGemmConfig(block_n=64, block_k=128, num_warps=4, num_stages=4),
    QuantGemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3, max_rows=4096),
)


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _quant_gemm_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
                           M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                           GROUP: tl.constexpr, INT4: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                           PDL: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/columns read a valid (wrapped) row; their results are never stored.
        safe_m = offs_m % M
        rows = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        # The weight codes are streamed one tile ahead of their use (register double-buffering:
        # Triton's pipeliner stages only loads feeding a dot directly), the first tile before
        # PDL's wait, since no kernel writes the weights.
        if INT4:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_b = tl.arange(0, HALF)
            q_ptrs = q_ptr + rows[:, None] * stride_qn + offs_b[None, :]
            q_next = tl.load(q_ptrs, mask=(offs_b < K // 2)[None, :], other=0)
        else:
            q_ptrs = q_ptr + rows[:, None] * stride_qn + offs_k[None, :]
            q_next = tl.load(q_ptrs, mask=(offs_k < K)[None, :], other=0)
        if PDL:  # x is the previous kernel's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            k_ok = kk < K
            if INT4 and not USE_DOT and BLOCK_M == 1:
                # One token row: sum codes x inputs per group, then scale once per group,
                # sum_k ((c - 8) s + z) x = s (sum c x - 8 sum x) + z sum x, with the even and
                # odd inputs against the low and high nibbles: ~2 operations a weight instead of
                # dequantizing each one (the int4 GEMV is bound by these, not by the bytes).
                packed = q_next
                q_next = tl.load(q_ptrs + (k + BLOCK_K) // 2, mask=((k + BLOCK_K) // 2 + offs_b < K // 2)[None, :],
                                 other=0)
                TILE_GROUPS_1: tl.constexpr = BLOCK_K // GROUP
                x_row = x_ptr + (pid_m * BLOCK_M % M) * stride_xm + k + 2 * offs_b
                x_even = tl.load(x_row, mask=k + 2 * offs_b < K, other=0.0).to(tl.float32)
                x_odd = tl.load(x_row + 1, mask=k + 2 * offs_b + 1 < K, other=0.0).to(tl.float32)
                products = (packed & 15).to(tl.float32) * x_even[None, :] + (packed >> 4).to(tl.float32) * x_odd[None, :]
                per_group = tl.sum(tl.reshape(products, [BLOCK_N, TILE_GROUPS_1, GROUP // 2]), axis=2)
                x_sums = tl.sum(tl.reshape(x_even + x_odd, [TILE_GROUPS_1, GROUP // 2]), axis=1)
                group = k // GROUP + tl.arange(0, TILE_GROUPS_1)
                group_ok = (group < K // GROUP)[None, :]
                where = rows[:, None] * stride_sn + group[None, :]
                scale = tl.load(scale_ptr + where, mask=group_ok, other=0.0).to(tl.float32)
                zero = tl.load(zero_ptr + where, mask=group_ok, other=0.0).to(tl.float32)
                contribution = scale * (per_group - 8.0 * x_sums[None, :]) + zero * x_sums[None, :]
                acc += tl.sum(contribution, axis=1)[:, None]
            else:
                if INT4:
                    packed = q_next
                    q_next = tl.load(q_ptrs + (k + BLOCK_K) // 2, mask=((k + BLOCK_K) // 2 + offs_b < K // 2)[None, :],
                                     other=0)
                    codes = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K])  # k = 2 * byte + nibble
                    # One scale and zero per row and group, loaded once per tile (not per weight) and
                    # broadcast over the group's codes (BLOCK_K is a multiple of GROUP).
                    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
                    group = k // GROUP + tl.arange(0, TILE_GROUPS)
                    group_ok = (group < K // GROUP)[None, :]
                    where = rows[:, None] * stride_sn + group[None, :]
                    scale = tl.load(scale_ptr + where, mask=group_ok, other=0.0).to(tl.float32)
                    zero = tl.load(zero_ptr + where, mask=group_ok, other=0.0).to(tl.float32)
                    grouped = tl.reshape(codes.to(tl.float32) - 8.0, [BLOCK_N, TILE_GROUPS, GROUP])
                    w = tl.reshape(grouped * scale[:, :, None] + zero[:, :, None], [BLOCK_N, BLOCK_K])
                else:
                    w = q_next.to(tl.float32)
                    q_next = tl.load(q_ptrs + k + BLOCK_K, mask=(k + BLOCK_K + offs_k < K)[None, :], other=0)
                x = tl.load(x_ptr + safe_m[None, :] * stride_xm + kk[:, None], mask=k_ok[:, None], other=0.0)
                if USE_DOT:
                    if IEEE:
                        acc = tl.dot(w.to(x.dtype), x, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(w.to(x.dtype), x, acc)
                else:
                    acc += tl.sum(w[:, :, None] * x.to(tl.float32)[None, :, :], axis=1)
        if not INT4:  # per-row scale: once, on the finished sums
            acc = acc * tl.load(scale_ptr + rows * stride_sn).to(tl.float32)[:, None]
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
        out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], result.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def triton_quant_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bias: torch.Tensor | None, group: int, config: QuantGemmConfig) -> torch.Tensor:
    """`x @ W.T + bias` for W stored as int8 (zeros None, scales [N, 1]) or int4 (q [N, K/2]
    uint8, scales and zeros [N, K/group]); x [..., K] 16-bit or fp32."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use quant_gemm_reference")
    int4 = zeros is not None
    n = q.shape[0]
    k = q.shape[1] * (2 if int4 else 1)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
    if int4 and (k % group or group & (group - 1) or config.block_k & (config.block_k - 1)):
        raise ValueError(f"int4 needs K ({k}) divisible by the group ({group}), and the group and "
                         f"block_k ({config.block_k}) powers of two")
    # int4 tiles span whole groups and at least 16 bytes a row (narrower tiles computed wrong
    # on an H100, compiled, where the interpreter was right: dot_n32_k16 with groups of 32).
    block_k = max(config.block_k, group, MIN_INT4_BLOCK_K) if int4 else config.block_k
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block_m = config.block_m(rows)
        grid = (-(-rows // block_m), -(-n // config.block_n))
        _quant_gemm_kernel[grid](
            x2, q, scales, zeros if int4 else scales, bias if bias is not None else out, out,
            rows, n, k, x2.stride(0), q.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, INT4=int4, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
            USE_DOT=config.use_dot, HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl.kernel_args(x2.device, rows),
        )
    return out.reshape(*lead, n)


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
