"""The PyTorch paged attention's sliding window: per-sequence prefill, batched prefill, and
the whole `paged_attention` entry point against attention written out position by position."""

from __future__ import annotations

import pytest
import torch

from thinkwise.kernels.paged_attention import (
    AttentionMetadata,
    FP8KVCache,
    decode_attention,
    dequantize_fp8,
    gather_context,
    pack_prefix_groups,
    paged_attention,
    prefill_attention,
    quantize_fp8,
    window_mask,
    write_kv_cache,
)

BLOCK = 4


def naive(query, keys, values, query_positions, scale, window):
    """Query i (at query_positions[i]) against keys 0..its position, the last `window` only."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    out = torch.empty_like(query)
    for i, p in enumerate(query_positions):
        first = 0 if window is None else max(0, p - window + 1)
        scores = torch.einsum("hd,lhd->hl", query[i], keys[first:p + 1]) * scale
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), values[first:p + 1])
    return out


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 1, 3, 8, 19, 500])
@pytest.mark.parametrize("n", [19, 5, 1])  # a whole prompt; a later chunk; one token
def test_prefill_window(window, n):
    keys, values = random(19, 2, 8, seed=1), random(19, 2, 8, seed=2)
    query = random(n, 4, 8, seed=3)
    got = prefill_attention(query, keys, values, 0.3, window)
    expected = naive(query, keys, values, range(19 - n, 19), 0.3, window)
    assert (got - expected).abs().max().item() < 1e-5
    if window is not None and window >= 19:  # wider than the context: full attention
        assert (got - prefill_attention(query, keys, values, 0.3)).abs().max().item() < 1e-6


def step(lengths, new_tokens, batched):
    """Metadata for prefill chunks of several sequences (no decodes), their blocks consecutive;
    with `batched`, the context slots and mask the GPU runner builds for one attention call."""
    tables, slots, context, query_seq, key_seq, key_pos, query_pos = [], [], [], [], [], [], []
    width = max((n + BLOCK - 1) // BLOCK for n in lengths)
    next_block = 0
    for s, (length, new) in enumerate(zip(lengths, new_tokens)):
        blocks = list(range(next_block, next_block + (length + BLOCK - 1) // BLOCK))
        next_block += len(blocks)
        tables.append(blocks + [0] * (width - len(blocks)))
        seq_slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)]
        slots += seq_slots[length - new:]
        context += seq_slots
        query_seq += [s] * new
        query_pos += list(range(length - new, length))
        key_seq += [s] * length
        key_pos += list(range(length))
    starts = [0]
    for new in new_tokens:
        starts.append(starts[-1] + new)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables), seq_lens=torch.tensor(lengths),
        query_start_loc=starts, seq_lens_host=list(lengths), num_decodes=0, block_size=BLOCK,
    )
    if batched:
        q_seq, k_seq = torch.tensor(query_seq), torch.tensor(key_seq)
        metadata.prefill_context_slots = torch.tensor(context)
        metadata.prefill_mask = (q_seq[:, None] == k_seq[None, :]) & (
            torch.tensor(key_pos)[None, :] <= torch.tensor(query_pos)[:, None])
    return metadata, next_block, query_pos


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("window", [None, 2, 6, 100])
def test_paged_prefill_window(batched, window):
    lengths, new_tokens = [13, 9, 4], [13, 5, 1]  # a prompt, a later chunk, one forced token
    metadata, num_blocks, query_pos = step(lengths, new_tokens, batched)
    k_cache, v_cache = random(num_blocks, BLOCK, 2, 8, seed=4), random(num_blocks, BLOCK, 2, 8, seed=5)
    query = random(sum(new_tokens), 4, 8, seed=6)
    got = paged_attention(query, k_cache, v_cache, metadata, 0.3, window)
    begin = 0
    for s, (length, new) in enumerate(zip(lengths, new_tokens)):
        table = metadata.block_tables[s]
        slots = torch.tensor([int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in range(length)])
        keys = k_cache.reshape(-1, 2, 8)[slots]
        values = v_cache.reshape(-1, 2, 8)[slots]
        expected = naive(query[begin:begin + new], keys, values, query_pos[begin:begin + new], 0.3, window)
        assert (got[begin:begin + new] - expected).abs().max().item() < 1e-5, f"sequence {s}"
        begin += new
    if batched and window is not None:
        assert window in metadata.window_masks  # made once, reused by the step's other windowed layers


def test_window_mask_keeps_each_rows_last_keys():
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
                        dtype=torch.bool)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(window_mask(mask, 2), expected)
    assert torch.equal(window_mask(mask, 5), mask)


# ----------------------------------------------------------------------------- 8-bit KV cache
# e4m3 keeps 3 mantissa bits: a normal element rounds within 1/16 of its value; below e4m3's
# smallest normal (2^-6 x scale) the spacing is 2^-9 x scale, so within 2^-10 x scale.


def fp8_cache(values: torch.Tensor) -> FP8KVCache:
    return FP8KVCache(*quantize_fp8(values))


def dequantized(cache: FP8KVCache) -> torch.Tensor:
    return dequantize_fp8(cache.codes, cache.scales)


def test_fp8_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    # Per-vector magnitudes from 1e-4 to 1e4 (the default model's attention-sink keys reach
    # raw q.k ~ 9,700; a static scale of 1 would saturate them at 448).
    x = torch.randn(512, 2, 32, generator=g) * torch.logspace(-4, 4, 512)[:, None, None]
    x[7, 1] = 0.0  # an all-zero vector
    codes, scales = quantize_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and scales.shape == x.shape[:2]
    back = dequantize_fp8(codes, scales)
    bound = torch.maximum(x.abs() / 16, scales[..., None] * 2.0**-10)
    assert torch.isfinite(back).all() and ((back - x).abs() <= bound * 1.0001).all()
    # Each vector's largest element lands on e4m3's largest value, so none saturates.
    assert torch.allclose(codes.float().abs().amax(-1)[x.abs().amax(-1) > 0], torch.tensor(448.0))
    assert (back[7, 1] == 0).all() and scales[7, 1] > 0


def test_fp8_write_then_gather_through_slots():
    g = torch.Generator().manual_seed(1)
    blocks, heads, dim = 6, 2, 16
    cache_k = FP8KVCache(torch.zeros(blocks, BLOCK, heads, dim, dtype=torch.float8_e4m3fn),
                         torch.zeros(blocks, BLOCK, heads))
    cache_v = FP8KVCache(torch.zeros_like(cache_k.codes), torch.zeros_like(cache_k.scales))
    key, value = torch.randn(7, heads, dim, generator=g) * 900, torch.randn(7, heads, dim, generator=g)
    table = torch.tensor([4, 1])  # 7 tokens: block 4 whole, block 1's first three slots
    slots = torch.tensor([4 * BLOCK + i for i in range(BLOCK)] + [BLOCK + i for i in range(3)])
    write_kv_cache(key, value, cache_k, cache_v, slots)
    for new, cache in ((key, cache_k), (value, cache_v)):
        expected = dequantize_fp8(*quantize_fp8(new))
        assert torch.equal(gather_context(cache, table, 7), expected)
    untouched = torch.ones(blocks * BLOCK, dtype=torch.bool)
    untouched[slots] = False
    assert (cache_k.scales.reshape(-1, heads)[untouched] == 0).all()


def decode_case(seed=0, lens=(1, 37, 70), heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + BLOCK - 1) // BLOCK for n in lens) + 2
    k = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g)
    v = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max((n + BLOCK - 1) // BLOCK for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    cursor = 0
    for b, n in enumerate(lens):
        count = (n + BLOCK - 1) // BLOCK
        tables[b, :count] = torch.tensor(order[cursor:cursor + count])
        cursor += count
    query = torch.randn(len(lens), heads, dim, generator=g)
    return query, k, v, tables, torch.tensor(lens)


@pytest.mark.parametrize("window", [None, 5])
def test_fp8_decode_reads_the_dequantized_values(window):
    """decode_attention on fp8 caches is attention over the dequantized values (plain, cascade
    and windowed): every read path dequantizes with the right scale."""
    q, k, v, tables, lens = decode_case()
    kf, vf = fp8_cache(k), fp8_cache(v)
    args = (tables, lens, 70, 0.25)
    expected = decode_attention(q, dequantized(kf), dequantized(vf), *args, window=window)
    assert (decode_attention(q, kf, vf, *args, window=window) - expected).abs().max() < 1e-5
    if window is None:  # rows 1 and 2 share their first 8 positions' blocks as a cascade group
        tables[2, :2] = tables[1, :2]
        prefix = pack_prefix_groups([[1, 2]], [8], 3, "cpu")
        expected = decode_attention(q, dequantized(kf), dequantized(vf), *args)
        assert (decode_attention(q, kf, vf, *args, prefix=prefix) - expected).abs().max() < 1e-5


def test_fp8_decode_close_to_full_precision():
    """Stated tolerance: on unit-variance random K/V/q, fp8 decode attention stays within 8% of
    the fp32 result in relative norm (observed <= 5% over 60 seeds and shapes; e4m3's rms
    rounding error per element is ~2.5%)."""
    for seed in range(5):
        q, k, v, tables, lens = decode_case(seed)
        full = decode_attention(q, k, v, tables, lens, 70, 0.25)
        low = decode_attention(q, fp8_cache(k), fp8_cache(v), tables, lens, 70, 0.25)
        assert ((low - full).norm() / full.norm()).item() < 0.08


@pytest.mark.parametrize("batched", [False, True])
def test_fp8_paged_prefill_reads_the_dequantized_values(batched):
    """Prefill over cached prefixes (the per-sequence gather) and the batched prefill path both
    attend to the dequantized cache."""
    lengths, new_tokens = [9, 5], [4, 5]
    metadata, num_blocks, _ = step(lengths, new_tokens, batched)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(num_blocks, BLOCK, 2, 16, generator=g) * 50
    v = torch.randn(num_blocks, BLOCK, 2, 16, generator=g)
    query = torch.randn(sum(new_tokens), 4, 16, generator=g)
    kf, vf = fp8_cache(k), fp8_cache(v)
    got = paged_attention(query, kf, vf, metadata, 0.25)
    expected = paged_attention(query, dequantized(kf), dequantized(vf), metadata, 0.25)
    assert (got - expected).abs().max() < 1e-5
