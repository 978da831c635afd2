"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step the scheduler hands out a token budget (`max_num_batched_tokens`). Running
sequences come first, in arrival order, each with all its pending tokens (one for a
decode step; more for a prefill chunk, forced tokens or recomputation). Then waiting
sequences are admitted while the budget, the sequence limit and free KV blocks last;
a long prompt is split across steps (chunked prefill). When a running sequence needs a
block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later (its
prefix blocks often survive in the prefix cache, so recomputation is usually cheap).
Requests join and leave between any two steps.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

from thinkwise.engine.block_manager import BlockManager
from thinkwise.engine.sequence import Sequence, SequenceStatus


@dataclass
class SharedPrefix:
    """Decode sequences of one batch whose block tables start with the same blocks (forked
    samples of one prompt): a fact about the batch, whatever a device makes of it (a GPU
    reads those `shared_tokens` of KV once for all members: cascade attention)."""

    members: list[int]  # indices into ScheduledBatch.sequences
    shared_tokens: int


@dataclass
class ScheduledBatch:
    sequences: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_size: int = 16

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @functools.cached_property
    def shared_prefixes(self) -> list[SharedPrefix]:
        """Which decode sequences share which leading blocks; found on first use, so a device
        that makes nothing of them (the CPU reference) pays nothing for them."""
        return find_shared_prefixes(self.sequences, self.num_new_tokens, self.block_size)


def find_shared_prefixes(sequences: list[Sequence], num_new_tokens: list[int], block_size: int) -> list[SharedPrefix]:
    """Group the batch's decode sequences by shared leading KV blocks.

    Forked samples hold the same physical blocks for their prompt (reference-counted, so
    the ids are equal); a shared block is always full, because a write into a shared
    block copies it first. Candidates are bucketed by their first block, then each
    bucket's shared run is the longest common prefix of its block tables, cut so the
    token being decoded stays in each sample's own suffix. Runs shorter than a block
    share nothing and are left out.
    """
    buckets: dict[int, list[int]] = {}
    for index, (seq, n) in enumerate(zip(sequences, num_new_tokens)):
        if n == 1 and seq.block_table:
            buckets.setdefault(seq.block_table[0], []).append(index)
    groups = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        # The token being decoded must stay in each sample's own suffix.
        shared = min(sequences[i].num_computed_tokens for i in members) // block_size
        first = sequences[members[0]].block_table
        for i in members[1:]:
            shared = _common_prefix(first, sequences[i].block_table, shared)
        tokens = shared * block_size
        if tokens > 0:
            groups.append(SharedPrefix(members, tokens))
    return groups


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`: a binary search over
    slice comparisons, which run in C (this is on every step's path)."""
    low, high = 0, min(limit, len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high - 1:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds blocks (a fork of a running one)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(block_size=self.block_manager.block_size)
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_pending_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.sequences.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                index += 1
        # Admitting new work right after a preemption would only thrash the cache.
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            admitted = self.block_manager.allocate_waiting(seq, budget, keep_watermark=bool(self.running))
            if admitted is None:
                break
            cached, num_new = admitted
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_preemptions == 0 and seq.sample_index == 0:
                seq.request.counts.prompt_tokens_cached += min(cached, seq.num_prompt_tokens)
            batch.sequences.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch
