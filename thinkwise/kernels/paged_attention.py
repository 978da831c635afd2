"""Paged KV-cache attention, plain-PyTorch reference implementation.

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads,
head_dim]`; a sequence owns a list of block ids (its block table) and token `p` of it
lives in slot `block_table[p // block_size] * block_size + p % block_size`. These
functions write new keys/values into their slots and attend each query token to its own
sequence's context, causally. They are the CPU path and the numerical twin that every
GPU kernel is tested against, so they favour clarity and exactness over speed, with one
concession: single-token (decode) queries of many sequences are handled as one padded
batch, because that is the hot loop of generation even on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# "torch" forces the reference everywhere (for debugging a kernel); "auto" uses Triton on CUDA.
ATTENTION_BACKEND = os.environ.get("THINKWISE_ATTENTION", "auto")


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged cache.

    Sequences are ordered so the first `num_decodes` have exactly one query token; the
    rest (prefill chunks, recomputation, forced tokens) have one or more.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64, context length after this step
    query_start_loc: list[int]  # num_seqs + 1 offsets into the flat batch (host)
    seq_lens_host: list[int]  # seq_lens as Python ints, to avoid device syncs
    num_decodes: int  # leading sequences with a single query token
    block_size: int
    # Static context width for decode attention (CUDA graphs need fixed shapes); None: the
    # longest decode context in this batch.
    decode_max_seq_len: int | None = None
    # Batched prefill (GPU): the cache slots of every prefill sequence's whole context,
    # concatenated, and the [prefill query tokens, context tokens] mask of who sees whom.
    prefill_context_slots: torch.Tensor | None = None
    prefill_mask: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store `key`/`value` ([num_tokens, num_kv_heads, head_dim]) into their slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence: `query` [B, H, D] -> [B, H, D].

    Contexts are gathered into a padded [B, L, Hkv, D] batch and masked past each
    sequence's length; grouped-query heads attend without repeating K/V.
    """
    batch, num_heads, head_dim = query.shape
    block_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:batch, :num_blocks]
    keys = k_cache[table].reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    values = v_cache[table].reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    q = query.view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", q, keys.to(q.dtype)).float() * scale
    positions = torch.arange(num_blocks * block_size, device=query.device)
    invalid = positions[None, :] >= seq_lens[:batch, None]
    scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values.to(query.dtype))
    return out.reshape(batch, num_heads, head_dim)


def prefill_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries are the last `n` of `L` context tokens: [n, H, D] x [L, Hkv, D] -> [n, H, D]."""
    n, num_heads, _ = query.shape
    length = keys.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)
    k = keys.to(query.dtype).transpose(0, 1).unsqueeze(0)
    v = values.to(query.dtype).transpose(0, 1).unsqueeze(0)
    if n == length:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at absolute position length - n + i and sees keys 0..that position.
        query_pos = torch.arange(length - n, length, device=query.device)
        key_pos = torch.arange(length, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def batched_prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_slots: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """All prefill chunks of a step in one attention call: the contexts are gathered into
    one flat sequence and a mask keeps each query to its own sequence, causally."""
    num_heads = query.shape[1]
    keys = k_cache.reshape(-1, *k_cache.shape[2:]).index_select(0, context_slots).to(query.dtype)
    values = v_cache.reshape(-1, *v_cache.shape[2:]).index_select(0, context_slots).to(query.dtype)
    group = num_heads // keys.shape[1]
    if group > 1:  # expand K/V heads so the memory-efficient kernel (which takes a mask) applies
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    return out.squeeze(0).transpose(0, 1)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _decode_backend(query: torch.Tensor, k_cache: torch.Tensor):
    """The Triton split-KV kernel on CUDA when it applies, else the PyTorch reference."""
    if ATTENTION_BACKEND != "torch" and query.is_cuda:
        from thinkwise.kernels.triton_decode_attention import HAVE_TRITON, triton_decode_attention

        if HAVE_TRITON and _is_power_of_two(query.shape[-1]) and _is_power_of_two(k_cache.shape[1]):
            return triton_decode_attention
    return decode_attention


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend every query token ([num_tokens, H, D]) to its sequence's cached context.

    The new tokens' keys/values must already be in the cache (`write_kv_cache`).
    """
    output = torch.empty_like(query)
    nd = metadata.num_decodes
    if nd:
        output[:nd] = _decode_backend(query, k_cache)(
            query[:nd], k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
            metadata.decode_max_seq_len or max(metadata.seq_lens_host[:nd]), scale,
        )
    starts = metadata.query_start_loc
    if metadata.prefill_context_slots is not None and nd < metadata.num_seqs:
        begin = starts[nd]
        output[begin:] = batched_prefill_attention(
            query[begin:], k_cache, v_cache, metadata.prefill_context_slots, metadata.prefill_mask, scale
        )
        return output
    for i in range(nd, metadata.num_seqs):
        begin, end = starts[i], starts[i + 1]
        length = metadata.seq_lens_host[i]
        table = metadata.block_tables[i]
        keys = gather_context(k_cache, table, length)
        values = gather_context(v_cache, table, length)
        output[begin:end] = prefill_attention(query[begin:end], keys, values, scale)
    return output
