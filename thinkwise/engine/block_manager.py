"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix reuse, fork.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence's block table
lists the blocks holding its tokens in order. Blocks are reference counted so that
samples forked from one prompt share the prompt's blocks; a shared block is copied only
when a sequence is about to write into it (copy-on-write, only ever the last, partial
block). Every full block whose KV has been computed is registered under a hash chained
to the previous block's hash (so equal hashes mean equal whole prefixes) together with
its token ids, which are compared on lookup; a later request with the same prefix
reuses those blocks instead of recomputing them. Freed blocks keep their contents and
registration until they are handed out again, oldest-freed first, so the prefix cache
costs no memory that is not otherwise idle.
"""

from __future__ import annotations

from collections import OrderedDict

from thinkwise.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens."""
    return (num_tokens + block_size - 1) // block_size


def chain_hash(previous: int, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # New requests are admitted only while this many blocks stay free, so running
        # sequences have room to grow without an immediate preemption.
        self.watermark_blocks = int(watermark * num_blocks)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}  # chain hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the runner before the next forward

    # ----------------------------------------------------------------- accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    # ----------------------------------------------------------------- primitives
    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        old_hash = self.block_hash[block_id]
        if old_hash is not None and self.cached_blocks.get(old_hash) == block_id:
            del self.cached_blocks[old_hash]
        self.block_hash[block_id] = None
        self.block_tokens[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"block {block_id} released more often than acquired"
        if self.ref_counts[block_id] == 0:
            self.free_blocks[block_id] = None

    # ----------------------------------------------------------------- prefix cache
    def _match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks covering a prefix of `seq`, and their chain hashes.

        At least the last token is left uncached: its logits are what sampling needs.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes: list[int] = []
        previous = 0
        bs = self.block_size
        for index in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
            h = chain_hash(previous, tokens)
            block_id = self.cached_blocks.get(h)
            if block_id is None or self.block_tokens[block_id] != tokens:
                break
            blocks.append(block_id)
            hashes.append(h)
            previous = h
        return blocks, hashes

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Register every block of `seq` that is now full and computed for prefix reuse.
        (With a step in flight, the last computed position's token may not be on the host
        yet; only positions whose tokens are known count.)"""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = seq.block_hashes
        for index in range(len(hashes), min(seq.num_computed_tokens, seq.num_tokens) // bs):
            tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else 0, tokens)
            hashes.append(h)
            block_id = seq.block_table[index]
            # A block already registered (shared prefix) or a duplicate of a registered
            # one (two equal prompts computed in the same step) is left as is.
            if self.block_hash[block_id] is None and h not in self.cached_blocks:
                self.block_hash[block_id] = h
                self.block_tokens[block_id] = tokens
                self.cached_blocks[h] = block_id

    # ----------------------------------------------------------------- per sequence
    def allocate_waiting(self, seq: Sequence, token_budget: int, keep_watermark: bool = True) -> tuple[int, int] | None:
        """Admit a sequence with no blocks: reuse cached prefix blocks, allocate the rest
        for up to `token_budget` new tokens. Returns (cached tokens, tokens to compute),
        or None (and changes nothing) if the blocks are not there. The watermark reserve
        is waived when nothing else runs, so a prompt that fits the cache always starts."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        matched, hashes = self._match_prefix(seq)
        cached = len(matched) * self.block_size
        num_new = min(seq.num_tokens - cached, token_budget)
        if num_new <= 0:
            return None
        needed = self.blocks_for(cached + num_new) - len(matched)
        revived = sum(1 for b in matched if self.ref_counts[b] == 0)
        if needed + revived > self.num_free_blocks - (self.watermark_blocks if keep_watermark else 0):
            return None
        for block_id in matched:
            self._acquire(block_id)
        seq.block_table = matched + [self._take_free_block() for _ in range(needed)]
        seq.block_hashes = hashes
        seq.num_computed_tokens = cached
        return cached, num_new

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room to write tokens [computed, computed + num_new_tokens) of `seq`,
        copying a shared block that would be written. False (and no change) if full."""
        first_written = seq.num_computed_tokens // self.block_size
        table = seq.block_table
        copy_on_write = first_written < len(table) and self.ref_counts[table[first_written]] > 1
        new_blocks = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(table)
        if new_blocks + copy_on_write > self.num_free_blocks:
            return False
        if copy_on_write:
            source = table[first_written]
            table[first_written] = self._take_free_block()
            self.pending_copies.append((source, table[first_written]))
            self._release(source)
        for _ in range(max(new_blocks, 0)):
            table.append(self._take_free_block())
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release blocks past the first `num_tokens` positions (allocated ahead for a step
        whose work was dropped), so the sequence's table is what it would have been."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())
        del seq.block_hashes[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` the parent's blocks (shared, reference-counted) and progress."""
        for block_id in parent.block_table:
            self._acquire(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        # Tail blocks are released first so they are evicted first: the head of a
        # prompt is the part most likely to be shared again.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (blocks in use keep their contents)."""
        self.cached_blocks.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks
