"""CUDA graphs for decode steps: one captured graph per (batch size, context bucket).

A decode step of a small model is dominated by launching hundreds of small kernels
from Python, not by the GPU work. A captured graph replays the whole forward pass
(embedding, every layer, final norm, logits) with one launch. Graphs need static
shapes, so the batch is padded up a ladder of sizes (1, 2, 4, ... 256) and the block
tables up a ladder of context widths; padding rows write their KV into a scratch block
that no sequence owns and attend only to it, so they cannot disturb real sequences.
Graphs are captured lazily the first time a shape is needed and share one memory pool.
Steps with shared-prefix (cascade) groups use their own graphs, whose group tables are
sized for the worst case (every group of two) and padded with empty groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkwise.engine.scheduler import PrefixGroup
from thinkwise.engine.sequence import Sequence
from thinkwise.kernels.paged_attention import AttentionMetadata, PrefixGroups, pack_prefix_groups

BATCH_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def round_up(value: int, ladder: tuple[int, ...]) -> int | None:
    for step in ladder:
        if value <= step:
            return step
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    logits: torch.Tensor
    prefix: PrefixGroups | None = None


class CudaGraphDecoder:
    def __init__(self, model, kv_caches, *, block_size: int, scratch_block: int, max_blocks_per_seq: int,
                 device: torch.device, max_batch: int = 256, unified_max: float | None = None):
        self.model = model
        self.unified_max = unified_max
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.batch_ladder = tuple(b for b in BATCH_LADDER if b <= max_batch) or (1,)
        widths = []
        width = 8
        while width < max_blocks_per_seq:
            widths.append(width)
            width *= 2
        widths.append(max_blocks_per_seq)
        self.width_ladder = tuple(widths)
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.pool = None

    def supports(self, num_seqs: int, max_blocks: int) -> bool:
        return round_up(num_seqs, self.batch_ladder) is not None and round_up(max_blocks, self.width_ladder) is not None

    def _capture(self, batch: int, width: int, cascade: bool) -> _Graph:
        device = self.device
        scratch_slot = self.scratch_block * self.block_size
        input_ids = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.zeros(batch, dtype=torch.long, device=device)
        slot_mapping = torch.full((batch,), scratch_slot, dtype=torch.long, device=device)
        block_tables = torch.full((batch, width), self.scratch_block, dtype=torch.long, device=device)
        seq_lens = torch.ones(batch, dtype=torch.long, device=device)
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
            query_start_loc=list(range(batch + 1)), seq_lens_host=[1] * batch, num_decodes=batch,
            block_size=self.block_size, decode_max_seq_len=width * self.block_size, unified_max=self.unified_max,
        )
        if cascade:
            metadata.prefix_groups = pack_prefix_groups([], [], batch, device, num_groups=max(1, batch // 2),
                                                        max_prefix_len=width * self.block_size)

        def forward() -> torch.Tensor:
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
            return self.model.compute_logits(hidden)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
                forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        if self.pool is None:
            self.pool = graph.pool()
        return _Graph(graph, input_ids, positions, slot_mapping, block_tables, seq_lens, logits, metadata.prefix_groups)

    @torch.inference_mode()
    def run(self, sequences: list[Sequence], prefix_groups: list[PrefixGroup] | None = None,
            token_source: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [len(sequences), vocab] for a batch where every sequence computes one token.
        With `token_source` (tokens, rows) on the device, sequence i's input token is
        tokens[rows[i]]: a step launched before the previous step's tokens reached the host.
        Inputs travel through pinned memory, so launching never waits for the device."""
        n = len(sequences)
        max_blocks = max(len(s.block_table) for s in sequences)
        key = (round_up(n, self.batch_ladder), round_up(max_blocks, self.width_ladder), bool(prefix_groups))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        bs = self.block_size
        ids, pos, slots, lens = [], [], [], []
        table = [[self.scratch_block] * key[1] for _ in range(key[0])]
        for row, seq in enumerate(sequences):
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p] if token_source is None else 0)
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            table[row][: len(seq.block_table)] = seq.block_table
        pad = key[0] - n
        scratch_slot = self.scratch_block * bs
        host = torch.tensor(
            [ids + [0] * pad, pos + [0] * pad, slots + [scratch_slot] * pad, lens + [1] * pad], dtype=torch.long
        )
        host_table = torch.tensor(table, dtype=torch.long).pin_memory()
        staged = host.pin_memory().to(self.device, non_blocking=True)
        entry.input_ids.copy_(staged[0])
        if token_source is not None:
            tokens, rows = token_source
            entry.input_ids[:n].copy_(tokens.index_select(0, rows))
        entry.positions.copy_(staged[1])
        entry.slot_mapping.copy_(staged[2])
        entry.seq_lens.copy_(staged[3])
        entry.block_tables.copy_(host_table.to(self.device, non_blocking=True))
        if entry.prefix is not None:
            packed = pack_prefix_groups([g.members for g in prefix_groups], [g.shared_tokens for g in prefix_groups],
                                        key[0], "cpu", num_groups=entry.prefix.rows.shape[0])
            entry.prefix.rows.copy_(packed.rows.pin_memory().to(self.device, non_blocking=True))
            entry.prefix.prefix_lens.copy_(packed.prefix_lens.pin_memory().to(self.device, non_blocking=True))
            entry.prefix.row_starts.copy_(packed.row_starts.pin_memory().to(self.device, non_blocking=True))
        entry.graph.replay()
        return entry.logits[:n]
