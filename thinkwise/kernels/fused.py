"""Fused element-wise kernels of a decoder layer, each with its plain-PyTorch twin.

A small model's decode step is mostly tiny kernels: one RMSNorm is seven PyTorch ops
(cast, square, mean, add, rsqrt, multiply, cast and scale), rotary embedding another
handful per tensor, and each one costs a launch and a round trip through memory. Here
each group is one Triton kernel: residual add + RMSNorm; Qwen3's per-head q/k norm +
rotary embedding + writing K and V into their paged-cache slots; SiLU(gate) * up. The
twins are the model's original op sequences (identical numerics to Hugging Face), used on
CPU, when Triton is missing, and with `EngineConfig.fused_kernels` off (THINKWISE_FUSED=0);
the kernels compute in fp32 and round where the twins round, so bf16 results agree to rounding.
On CPU the same groups are single C++ operators (cpu_decode_ops) where they apply.
With an fp8 KV cache (`paged_attention.FP8KVCache`) the q/k/v kernel quantizes each K and V
head vector as it stores it, with its own scale (amax / 448), as the twin's `write_kv_cache` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinkwise.kernels import cpu_decode_ops, pdl
from thinkwise.kernels.paged_attention import FP8KVCache, write_kv_cache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the twins run instead
    triton = None
    tl = None

FUSED = True  # set from EngineConfig.fused_kernels by the engine (`set_fused_kernels`)


def set_fused_kernels(enabled: bool) -> None:
    global FUSED
    FUSED = bool(enabled)


def _use_triton(x: torch.Tensor) -> bool:
    return FUSED and triton is not None and x.is_cuda


def _use_cpu_ops(*tensors) -> bool:
    """The C++ CPU operators (cpu_decode_ops) take these: CPU tensors of one dtype, contiguous rows."""
    return FUSED and cpu_decode_ops.applies(*tensors)


def _pdl(x: torch.Tensor) -> dict:
    """The PDL constexpr and launch option for a kernel over x's rows (see kernels/pdl.py)."""
    return pdl.kernel_args(x.device, x.shape[0])


# ----------------------------------------------------------------------------- twins


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (Hugging Face's rounding order)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x, residual, weight, eps):
    residual = x if residual is None else x + residual
    return rms_norm_reference(residual, weight, eps), residual


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-rotation rotary embedding: x [tokens, heads, head_dim], cos/sin [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qkv_rotary_cache_reference(qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                               num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q = rms_norm_reference(q, q_norm_weight, eps)
        k = rms_norm_reference(k, k_norm_weight, eps)
    q = apply_rotary_reference(q, cos, sin)
    k = apply_rotary_reference(k, cos, sin)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# The gated activations a model may pick for its MLP: act(gate) * up. "gelu_tanh" is
# transformers' `gelu_pytorch_tanh` (Gemma); the kernel's ACTIVATION code is the index.
GATED_ACTIVATIONS = ("silu", "gelu_tanh")


def gated_activation_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return silu_mul_reference(gate_up)
    if activation == "gelu_tanh":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown gated activation {activation!r}; known: {', '.join(GATED_ACTIVATIONS)}")


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps,
                             stride_x, stride_r, stride_o,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream rounds to its dtype
            tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
        normed = (x32 * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _to_e4m3_grid(x):
        """fp32 values within +-448 rounded (to nearest even) onto e4m3's values, still fp32, so
        the store's conversion is exact. Hardware rounds the same way; the Triton interpreter's
        fp32 -> fp8 conversion drops the carry into the exponent (127.9 -> 64), so the kernel
        rounds first and the interpreter tests check the real codes."""
        bits = x.to(tl.int32, bitcast=True)
        # Normal range: keep 3 mantissa bits; the integer add carries into the exponent.
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        # Below 2^-6 e4m3 is subnormal, spaced 2^-9: round |x| by adding and removing 1.5 x 2^14
        # (fp32's spacing there is 2^-9), then put the sign back (-0 stays -0, as torch converts).
        magnitude = tl.abs(x)
        subnormal = (magnitude + 24576.0) - 24576.0
        subnormal = tl.where(bits < 0, -subnormal, subnormal)
        return tl.where(magnitude < 0.015625, subnormal, normal)

    @triton.jit
    def _e4m3_codes(x, scale):
        """x / scale clamped to e4m3's range and rounded onto its grid (the store converts exactly)."""
        return _to_e4m3_grid(tl.minimum(tl.maximum(x / scale, -448.0), 448.0))

    @triton.jit
    def _qkv_rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr,
                                 k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr, eps,
                                 stride_qkv, stride_cos, stride_qo_t, stride_qo_h,
                                 stride_cache_slot, stride_cache_head,
                                 block_size, stride_scale_block, stride_scale_tok, stride_scale_head,
                                 NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 QK_NORM: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        token = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        half = tl.arange(0, HEAD_DIM // 2)
        base = qkv_ptr + token * stride_qkv + head * HEAD_DIM
        slot = tl.load(slot_ptr + token)
        # A slot's scales sit at (block, position, head) strides of their own (fp8 only).
        scale_base = (slot // block_size) * stride_scale_block + (slot % block_size) * stride_scale_tok
        if head >= NUM_HEADS + NUM_KV_HEADS:  # V: straight into its cache slot
            kv_head = head - NUM_HEADS - NUM_KV_HEADS
            d = tl.arange(0, HEAD_DIM)
            v = tl.load(base + d)
            if FP8:  # one scale per (token, head): amax / 448 (paged_attention.quantize_fp8)
                v32 = v.to(tl.float32)
                v_scale = tl.maximum(tl.max(tl.abs(v32), 0), 1e-30) / 448.0  # e4m3's max (paged_attention.FP8_MAX)
                tl.store(v_scale_ptr + scale_base + kv_head * stride_scale_head, v_scale)
                v = _e4m3_codes(v32, v_scale)
            tl.store(v_cache_ptr + slot * stride_cache_slot + kv_head * stride_cache_head + d,
                     v.to(v_cache_ptr.dtype.element_ty))
        else:
            x1 = tl.load(base + half)
            x2 = tl.load(base + HEAD_DIM // 2 + half)
            dtype = x1.dtype
            if QK_NORM:
                a = x1.to(tl.float32)
                b = x2.to(tl.float32)
                rstd = tl.rsqrt((tl.sum(a * a, 0) + tl.sum(b * b, 0)) / HEAD_DIM + eps)
                norm_ptr = q_norm_ptr if head < NUM_HEADS else k_norm_ptr
                w1 = tl.load(norm_ptr + half).to(tl.float32)
                w2 = tl.load(norm_ptr + HEAD_DIM // 2 + half).to(tl.float32)
                x1 = ((a * rstd).to(dtype).to(tl.float32) * w1).to(dtype)
                x2 = ((b * rstd).to(dtype).to(tl.float32) * w2).to(dtype)
            c = tl.load(cos_ptr + token * stride_cos + half).to(tl.float32)
            s = tl.load(sin_ptr + token * stride_cos + half).to(tl.float32)
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            out1 = a * c - b * s
            out2 = b * c + a * s
            # q_dst and k_dst keep apart: one name bound to two pointer types in the two branches
            # is a compile error (the interpreter does not check it).
            if head < NUM_HEADS:
                q_dst = q_out_ptr + token * stride_qo_t + head * stride_qo_h
                tl.store(q_dst + half, out1.to(q_out_ptr.dtype.element_ty))
                tl.store(q_dst + HEAD_DIM // 2 + half, out2.to(q_out_ptr.dtype.element_ty))
            else:
                dst = k_cache_ptr + slot * stride_cache_slot + (head - NUM_HEADS) * stride_cache_head
                if FP8:  # quantize the key as rounded to the compute dtype, like the twin
                    k1 = out1.to(dtype).to(tl.float32)
                    k2 = out2.to(dtype).to(tl.float32)
                    k_amax = tl.maximum(tl.max(tl.abs(k1), 0), tl.max(tl.abs(k2), 0))
                    k_scale = tl.maximum(k_amax, 1e-30) / 448.0  # e4m3's max (paged_attention.FP8_MAX)
                    tl.store(k_scale_ptr + scale_base + (head - NUM_HEADS) * stride_scale_head, k_scale)
                    k1 = _e4m3_codes(k1, k_scale)
                    k2 = _e4m3_codes(k2, k_scale)
                    tl.store(dst + half, k1.to(k_cache_ptr.dtype.element_ty))
                    tl.store(dst + HEAD_DIM // 2 + half, k2.to(k_cache_ptr.dtype.element_ty))
                else:
                    tl.store(dst + half, out1.to(dtype).to(k_cache_ptr.dtype.element_ty))
                    tl.store(dst + HEAD_DIM // 2 + half, out2.to(dtype).to(k_cache_ptr.dtype.element_ty))

    @triton.jit
    def _gated_kernel(gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr,
                      ACTIVATION: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # kernels/pdl.py: let the next kernel launch now; wait for the previous one's writes
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
        up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        if ACTIVATION == 0:  # silu
            act = g / (1.0 + tl.exp(-g))
        else:  # gelu_tanh: 0.5 g (1 + tanh(u)), with tanh(u) = 1 - 2 / (1 + exp(2u))
            u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            act = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))
        act = act.to(gate.dtype).to(tl.float32)  # the activation rounds to its dtype, as in PyTorch
        tl.store(out_ptr + row * stride_out + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- entry points


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rmsnorm(x + residual), x + residual); residual None: (rmsnorm(x), x). The new
    residual is written into `residual`'s storage on the Triton path."""
    if not _use_triton(x) or x.dim() != 2:
        if x.dim() == 2 and (residual is None or residual.is_contiguous()) and _use_cpu_ops(
                x, weight, *([] if residual is None else [residual])):
            return cpu_decode_ops.add_rms_norm(x, residual, weight, eps)
        return add_rms_norm_reference(x, residual, weight, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, cols = x.shape
    if residual is None:
        _add_rms_norm_kernel[(rows,)](x, x, weight, out, cols, eps, x.stride(0), x.stride(0), out.stride(0),
                                      HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(cols), **_pdl(x))
        return out, x
    _add_rms_norm_kernel[(rows,)](x, residual, weight, out, cols, eps, x.stride(0), residual.stride(0), out.stride(0),
                                  HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(cols), **_pdl(x))
    return out, residual


def qkv_rotary_cache(qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                     num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """From the fused qkv projection: optional per-head q/k RMSNorm (Qwen3), rotary on q and k,
    k and v written to their cache slots; returns q as [num_tokens, heads, head_dim]."""
    if not _use_triton(qkv) or head_dim & (head_dim - 1):
        norms = [] if q_norm_weight is None else [q_norm_weight, k_norm_weight]
        if (not isinstance(k_cache, FP8KVCache) and k_cache.is_contiguous() and v_cache.is_contiguous()
                and _use_cpu_ops(qkv, cos, sin, k_cache, v_cache, *norms)):
            return cpu_decode_ops.qkv_rotary_cache(qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                                                   slot_mapping, num_heads, num_kv_heads, head_dim)
        return qkv_rotary_cache_reference(qkv, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache,
                                          slot_mapping, num_heads, num_kv_heads, head_dim)
    num_tokens = qkv.shape[0]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    qk_norm = q_norm_weight is not None
    fp8 = isinstance(k_cache, FP8KVCache)
    k_scales, v_scales = (k_cache.scales, v_cache.scales) if fp8 else (qkv, qkv)  # unused pointers without fp8
    if fp8:
        if k_scales.stride() != v_scales.stride() or k_cache.codes.stride() != v_cache.codes.stride():
            raise ValueError("fp8 KV cache layout: K and V codes (and scales) must share their strides")
        k_cache, v_cache = k_cache.codes, v_cache.codes
    _qkv_rotary_cache_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv, q,
        k_cache, v_cache, k_scales, v_scales, slot_mapping, eps,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], *(k_scales.stride() if fp8 else (0, 0, 0)),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, QK_NORM=qk_norm, FP8=fp8, **_pdl(qkv),
    )
    return q


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(gate) * up for the fused [.., 2 x intermediate] gate/up projection output;
    `activation` is one of GATED_ACTIVATIONS."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown gated activation {activation!r}; known: {', '.join(GATED_ACTIVATIONS)}")
    if not _use_triton(gate_up) or gate_up.dim() != 2:
        if activation == "silu" and gate_up.dim() == 2 and gate_up.stride(-1) == 1 and _use_cpu_ops(gate_up):
            return cpu_decode_ops.silu_mul(gate_up)
        return gated_activation_reference(gate_up, activation)
    rows, width = gate_up.shape
    cols = width // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _gated_kernel[(rows, triton.cdiv(cols, block))](gate_up, out, cols, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                    ACTIVATION=GATED_ACTIVATIONS.index(activation), **_pdl(gate_up))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the Llama family's gated activation)."""
    return gated_activation(gate_up, "silu")
