"""BlockManager: allocation, reference counts, prefix reuse, copy-on-write, no leaks."""

from __future__ import annotations

import pytest

from thinkwise.engine import block_manager as block_manager_module
from thinkwise.engine.block_manager import BlockManager
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import Request, Sequence


def make_seq(tokens: list[int]) -> Sequence:
    request = Request("r", None, list(tokens), SamplingParams())
    return Sequence(request, tokens, len(tokens), 0, 0)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.allocate_waiting(seq, token_budget=100) == (0, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    seq.num_computed_tokens = 10
    seq.token_ids.append(99)
    assert bm.allocate_slots(seq, 1)  # position 10 still fits block 2
    assert len(seq.block_table) == 3
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.block_table == []


def test_allocation_refuses_without_changing_anything():
    bm = BlockManager(num_blocks=2, block_size=4, watermark=0)
    seq = make_seq(list(range(12)))
    assert bm.allocate_waiting(seq, 100) is None
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_prefix_blocks_are_reused_and_token_ids_checked():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(13)))
    bm.allocate_waiting(first, 100)
    first.num_computed_tokens = 13
    bm.register_computed_blocks(first)  # 3 full blocks registered
    second = make_seq(list(range(12)) + [50, 51])
    cached, new = bm.allocate_waiting(second, 100)
    assert cached == 12 and new == 2
    assert second.block_table[:3] == first.block_table[:3]
    assert all(bm.ref_counts[b] == 2 for b in first.block_table[:3])
    # The last token is never served from cache: its logits must be computed.
    third = make_seq(list(range(12)))
    assert bm.allocate_waiting(third, 100)[0] == 8
    # An unrelated prompt shares nothing (forced collisions are tested below).
    other = make_seq([7] * 13)
    assert bm.allocate_waiting(other, 100)[0] == 0


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence admitted, fully computed and registered, as the engine leaves a prefill."""
    seq = make_seq(tokens)
    assert bm.allocate_waiting(seq, 100) is not None
    seq.num_computed_tokens = len(tokens)
    bm.register_computed_blocks(seq)
    return seq


X, Y, Z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]


def test_a_block_is_reused_only_under_the_same_whole_prefix():
    # A = X Y . and B = Z Y . share their second block's tokens but not what precedes them,
    # so that block's KV differs. C = Z Y . must reuse B's blocks, never A's second block.
    bm = BlockManager(num_blocks=32, block_size=4)
    a = computed(bm, X + Y + [40])
    b = computed(bm, Z + Y + [41])
    assert bm.block_hash[b.block_table[1]] is not None, "B's second block must be registered under its own prefix"
    assert bm.block_hash[a.block_table[1]] != bm.block_hash[b.block_table[1]]
    c = make_seq(Z + Y + [42])
    assert bm.allocate_waiting(c, 100) == (8, 1)
    assert c.block_table[:2] == b.block_table[:2]
    assert a.block_table[1] not in c.block_table
    # A prompt whose first block was never seen reuses nothing, even with a known second block.
    d = make_seq([13, 14, 15, 16] + Y + [43])
    assert bm.allocate_waiting(d, 100)[0] == 0


def test_a_forced_hash_collision_never_serves_another_prompts_blocks(monkeypatch):
    # Every block hashes alike: only the token-id comparison tells prompts apart.
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda previous, tokens: 7)
    bm = BlockManager(num_blocks=32, block_size=4)
    a = computed(bm, X + Y + [40])
    b = make_seq(Z + Y + [41])
    assert bm.allocate_waiting(b, 100) == (0, 9)
    assert not set(a.block_table) & set(b.block_table)
    # The block registered under the colliding hash still serves the prompt it holds.
    again = make_seq(X + [50, 51])
    assert bm.allocate_waiting(again, 100)[0] == 4
    assert again.block_table[0] == a.block_table[0]


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(9)))
    bm.allocate_waiting(seq, 100)
    seq.num_computed_tokens = 9
    bm.register_computed_blocks(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 8
    again = make_seq(list(range(9)))
    assert bm.allocate_waiting(again, 100)[0] == 8


def test_fork_shares_blocks_and_copies_only_the_partial_block_on_write():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = make_seq(list(range(10)))
    bm.allocate_waiting(parent, 100)
    parent.num_computed_tokens = 10
    children = [make_seq(list(range(10))) for _ in range(3)]
    for child in children:
        bm.fork(parent, child)
    assert bm.num_used_blocks == 3
    assert all(bm.ref_counts[b] == 4 for b in parent.block_table)
    shared_partial = parent.block_table[2]
    for seq in [parent] + children:
        seq.token_ids.append(1)
        assert bm.allocate_slots(seq, 1)
    # The two full blocks stay shared; each writer got its own copy of the partial one,
    # except the last, which found itself the sole owner.
    copies = bm.take_pending_copies()
    assert len(copies) == 3
    assert all(src == shared_partial for src, _ in copies)
    assert children[-1].block_table[2] == shared_partial
    assert len({s.block_table[2] for s in [parent] + children}) == 4
    assert bm.ref_counts[parent.block_table[0]] == 4
    for seq in [parent] + children:
        bm.free(seq)
    assert bm.num_free_blocks == 16


def test_release_more_than_acquired_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2, 3])
    bm.allocate_waiting(seq, 10)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError):
        bm.free(seq)


def test_bad_sizes_are_refused_and_the_smallest_cache_works():
    for num_blocks, block_size in ((0, 4), (4, 0), (-1, 1)):
        with pytest.raises(ValueError, match="num_blocks and block_size must be >= 1"):
            BlockManager(num_blocks=num_blocks, block_size=block_size)
    bm = BlockManager(num_blocks=1, block_size=1, watermark=0)
    seq = make_seq([5])
    assert bm.allocate_waiting(seq, 10) == (0, 1) and bm.num_free_blocks == 0


def test_the_watermark_holds_back_blocks_for_running_sequences_only():
    bm = BlockManager(num_blocks=200, block_size=4, watermark=0.05)
    assert bm.watermark_blocks == 10
    big = make_seq(list(range(4 * 195)))  # 195 blocks: leaves 5 free, under the 10 held back
    assert bm.allocate_waiting(big, 10_000) is None
    assert bm.num_free_blocks == 200 and big.block_table == []
    assert bm.allocate_waiting(big, 10_000, keep_watermark=False) == (0, 4 * 195)  # nothing else runs
    assert bm.num_free_blocks == 5


def test_trim_releases_the_blocks_allocated_ahead():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = computed(bm, list(range(9)))  # 3 blocks, 2 full and registered
    assert bm.allocate_slots(seq, 8)  # room for positions 9-16: two more blocks
    assert len(seq.block_table) == 5 and bm.num_free_blocks == 3
    kept = seq.block_table[:3]
    bm.trim(seq, 9)
    assert seq.block_table == kept and bm.num_free_blocks == 5
    assert len(seq.block_hashes) == 2
    bm.trim(seq, 8)  # the partial third block goes too; the two full ones stay
    assert seq.block_table == kept[:2] and bm.num_free_blocks == 6 and len(seq.block_hashes) == 2
    bm.trim(seq, 4)  # the hashes follow the table: no hash for a block the sequence no longer holds
    assert seq.block_table == kept[:1] and len(seq.block_hashes) == 1


def test_reset_prefix_cache_forgets_every_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = computed(bm, X + Y + [40])
    bm.free(first)
    bm.reset_prefix_cache()
    assert bm.cached_blocks == {} and all(h is None for h in bm.block_hash)
    again = make_seq(X + Y + [40])
    assert bm.allocate_waiting(again, 100) == (0, 9)
