"""The PyTorch paged attention's sliding window: per-sequence prefill, batched prefill, and
the whole `paged_attention` entry point against attention written out position by position."""

from __future__ import annotations

import pytest
import torch

from thinkwise.kernels.paged_attention import AttentionMetadata, paged_attention, prefill_attention, window_mask

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
