"""The per-layer decode operations on CPU as single C++ operators (csrc/cpu_decode_ops.cpp).

A batch-1 decode step of a small model is bounded less by its matmuls than by the many
small PyTorch ops around them: residual add + RMSNorm, q/k norm + rotary + the K/V cache
write, paged decode attention (gather, two einsums, mask, softmax) and SiLU(gate) * up,
about forty ATen calls per layer at a few microseconds each. Here each group is one call.
They are the CPU counterparts of the Triton kernels in fused.py and triton_decode_attention.py
and are tested against the same PyTorch twins (they round where the twins round; only fp32
summation order differs). Built on first use like cpu_quant_gemm (kernels/cpu_build.py),
with -march=native for the building machine; wherever one does not apply (no compiler, a
dtype or cache layout it does not take, an fp8 KV cache) the callers run the twins, and
`status()` says why in the run metadata. `EngineConfig.fused_kernels` off runs the twins of
the element-wise groups and `attention_backend="torch"` the attention twin, as on CUDA.
"""

from __future__ import annotations

import torch

from thinkwise.kernels import cpu_build

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself
# is compiled with OpenMP (-fopenmp-simd alone, as before, left attention over a long context on
# one thread whatever torch's thread count); libgomp is the one torch already loaded (same soname).
# -ffp-contract=off: no fused multiply-adds the twins do not do. -fno-trapping-math changes no
# result, only lets the compiler evaluate a division or comparison it cannot prove trap-free in
# every lane: without it SiLU's and softmax's loops (exp, divide, clamp) stayed scalar, e.g.
# silu_mul over Qwen2.5-0.5B's 4864 columns 47 us instead of 16 on an AVX2 EPYC.
_library = cpu_build.CppLibrary("cpu_decode_ops", cpu_build.CSRC / "cpu_decode_ops.cpp",
                                ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"])
status = _library.status  # {"available": bool, "reason": ...}; builds on first call
available = _library.available


def applies(*tensors: torch.Tensor) -> bool:
    """True when the operators can take these tensors: CPU, one dtype they support, built.
    (Called per layer per step: a plain loop, no generator.)"""
    first = tensors[0]
    # `is_cpu`, not `device.type`: the latter builds a device object and its name (~0.4 us
    # against ~0.1), and this runs ~120 times a decode step.
    if not first.is_cpu or first.dtype not in DTYPES:
        return False
    for t in tensors:
        if t.dtype != first.dtype:
            return False
    return available()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rmsnorm(x + residual), x + residual) with the sum written into `residual`;
    residual None: (rmsnorm(x), x)."""
    x = x.contiguous()
    out = torch.ops.thinkwise_cpu_decode.add_rms_norm.default(x, residual, weight, eps)
    return out, x if residual is None else residual


def qkv_rotary_cache(qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                     num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    return torch.ops.thinkwise_cpu_decode.qkv_rotary_cache.default(
        qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
        num_heads, num_kv_heads, head_dim)


def decode_attention(query, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, unified_max=None,
                     prefix=None, window=None) -> torch.Tensor:
    """paged_attention.decode_attention's signature and result. `unified_max` and `prefix`
    change nothing: this kernel always takes the exact softmax over each row's whole
    context, which is what the cascade merge reproduces."""
    return torch.ops.thinkwise_cpu_decode.decode_attention.default(
        query, k_cache, v_cache, block_tables, seq_lens, scale, window or 0)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.thinkwise_cpu_decode.silu_mul.default(gate_up)


def record() -> dict[str, str]:
    """What runs a CPU decode step's per-layer operations, for the run metadata."""
    current = status()
    if current["available"]:
        return {"operators": "thinkwise cpu_decode_ops (C++: norms, rotary + KV write, decode attention, SiLU*up)"}
    return {"operators": "pytorch twins", "why": current["reason"]}
