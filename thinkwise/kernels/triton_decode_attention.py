"""Paged decode attention in Triton, split-KV (FlashDecoding); twin of `decode_attention`.

One program handles one sequence, one KV head (all the query heads of its group at
once, so grouped-query attention reads each K/V tile once) and one split of the
context. It walks the split in tiles of at least 16 tokens, gathering each token's
cache slot through the block table, keeps an online softmax (running max, running sum,
unnormalised accumulator) and writes its partial result; a second small kernel merges
the splits by log-sum-exp. Splitting the context gives a single long sequence enough
programs to fill the GPU. The signature equals the PyTorch reference's, which tests
compare against (on CPU under TRITON_INTERPRET=1, on the GPU for speed).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch reference runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None


if HAVE_TRITON:

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr,
        scale, tiles_per_split,
        stride_qb, stride_qh,
        stride_kblock, stride_ktok, stride_khead,
        stride_tb,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, TILE)
        heads = kv_head * GROUP + g
        head_ok = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        num_tiles = tl.cdiv(seq_len, TILE)
        first = split * tiles_per_split
        last = tl.minimum(first + tiles_per_split, num_tiles)
        for tile in range(first, last):
            pos = tile * TILE + t
            valid = pos < seq_len
            block_ids = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            offsets = block_ids * stride_kblock + (pos % BLOCK_SIZE) * stride_ktok + kv_head * stride_khead
            k = tl.load(k_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :]
        tl.store(out, acc, mask=head_ok[:, None])
        tl.store(max_ptr + b * stride_mb + heads * stride_mh + split, m_i, mask=head_ok)
        tl.store(sum_ptr + b * stride_mb + heads * stride_mh + split, l_i, mask=head_ok)

    @triton.jit
    def _merge_splits_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, num_splits,
        stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        used = s < num_splits
        m = tl.load(max_ptr + b * stride_mb + h * stride_mh + s, mask=used, other=float("-inf"))
        l = tl.load(sum_ptr + b * stride_mb + h * stride_mh + s, mask=used, other=0.0)
        top = tl.max(m, 0)
        weight = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        total = tl.sum(l * weight, 0)
        acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + s[:, None] * stride_as + d[None, :],
                      mask=used[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / total
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _next_power_of_two(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def choose_splits(batch: int, num_kv_heads: int, num_tiles: int, device: torch.device) -> int:
    """Enough splits that batch x kv_heads x splits fills the GPU about twice."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    wanted = max(1, (2 * sms) // max(1, batch * num_kv_heads))
    return max(1, min(wanted, num_tiles, 64))


def triton_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Same contract as `paged_attention.decode_attention`: query [B, H, D] -> [B, H, D]."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    tile = max(16, block_size)
    num_tiles = (max_seq_len + tile - 1) // tile
    splits = choose_splits(batch, num_kv_heads, num_tiles, query.device)
    tiles_per_split = (num_tiles + splits - 1) // splits
    splits = (num_tiles + tiles_per_split - 1) // tiles_per_split
    query = query.contiguous()
    acc = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    maxes = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxes)
    tables = block_tables[:batch]
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        query, k_cache, v_cache, tables, seq_lens, acc, maxes, sums,
        scale, tiles_per_split,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        maxes.stride(0), maxes.stride(1),
        GROUP=group, GROUP_PAD=max(16, _next_power_of_two(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile, IEEE=query.dtype == torch.float32,
    )
    out = torch.empty_like(query)
    _merge_splits_kernel[(batch, num_heads)](
        acc, maxes, sums, out, splits,
        acc.stride(0), acc.stride(1), acc.stride(2), maxes.stride(0), maxes.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_PAD=max(2, _next_power_of_two(splits)),
    )
    return out
