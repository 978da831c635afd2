"""Decode attention in bf16 keeps its scores in fp32, as prefill (SDPA) does.

The regression behind issue 20: the CPU decode path multiplied q and k in bf16, rounding
each raw score to 8 bits of mantissa before the softmax scale. Keys with a large shared
component (the attention sinks of Qwen2.5, raw scores near 10,000) then lost whole nats
per score and decode drifted from prefill. These cases build exactly that situation and
compare both paths against fp32 attention over the same bf16 inputs.
"""

from __future__ import annotations

import torch

from thinkwise.kernels.paged_attention import decode_attention, pack_prefix_groups, prefill_attention

HEAD_DIM = 64
NUM_HEADS, NUM_KV_HEADS = 4, 2
BLOCK = 4


def _sink_like_inputs(length: int, seed: int = 0):
    """bf16 q/k/v whose raw q.k sit near 8,000 with a spread of a few dozen (like Qwen2.5's)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.ones(HEAD_DIM) / HEAD_DIM**0.5
    q = (90.0 * direction + torch.randn(NUM_HEADS, HEAD_DIM, generator=g)).bfloat16()
    k = (90.0 * direction + 2.0 * torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=g)).bfloat16()
    v = torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=g).bfloat16()
    return q, k, v


def _exact(q, k, v, scale):
    """fp32 attention of the last position over all keys, on the same (bf16-valued) inputs."""
    group = NUM_HEADS // NUM_KV_HEADS
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.float(), keys) * scale
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), values)


def _paged(k, v, length):
    blocks = (length + BLOCK - 1) // BLOCK
    k_cache = torch.zeros(blocks, BLOCK, NUM_KV_HEADS, HEAD_DIM, dtype=k.dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:length] = k
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:length] = v
    table = torch.arange(blocks)[None, :]
    return k_cache, v_cache, table


def test_decode_matches_prefill_and_fp32_with_large_shared_key_component():
    length, scale = 37, HEAD_DIM**-0.5
    q, k, v = _sink_like_inputs(length)
    raw = torch.einsum("hd,lhd->hl", q.float(), k.float().repeat_interleave(2, dim=1))
    assert raw.min() > 4000  # bf16 spacing there is >= 32: rounding raw scores would cost >= 4 nats
    exact = _exact(q, k, v, scale)
    k_cache, v_cache, table = _paged(k, v, length)
    decoded = decode_attention(q[None], k_cache, v_cache, table, torch.tensor([length]), length, scale)[0]
    prefilled = prefill_attention(q[None], k, v, scale)[0]  # SDPA: the path prefill takes
    prefill_error = (prefilled.float() - exact).abs().max().item()
    decode_error = (decoded.float() - exact).abs().max().item()
    # Both paths may only lose the final bf16 rounding of the output (|out| < 4: spacing 1/64).
    assert prefill_error < 0.02
    assert decode_error < 0.02, f"decode attention lost precision: {decode_error:.3f} from fp32 (prefill {prefill_error:.3f})"
    assert (decoded.float() - prefilled.float()).abs().max().item() < 0.03


def test_cascade_decode_keeps_fp32_scores():
    """The cascade (shared-prefix) merge reads the same fp32 scores."""
    length, scale = 33, HEAD_DIM**-0.5
    q, k, v = _sink_like_inputs(length, seed=1)
    exact = _exact(q, k, v, scale)
    k_cache, v_cache, table = _paged(k, v, length)
    prefix = pack_prefix_groups([[0]], [16], batch=1, device="cpu")
    decoded = decode_attention(q[None], k_cache, v_cache, table, torch.tensor([length]), length, scale,
                               prefix=prefix)[0]
    assert (decoded.float() - exact).abs().max().item() < 0.02
