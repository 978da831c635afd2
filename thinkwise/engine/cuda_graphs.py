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

from thinkwise.engine.scheduler import SharedPrefix
from thinkwise.engine.sequence import Sequence
from thinkwise.engine.step_inputs import StepInputs, build_step_inputs
from thinkwise.kernels.paged_attention import AttentionMetadata, PrefixGroups, pack_prefix_groups

BATCH_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def round_up(value: int, ladder: tuple[int, ...]) -> int | None:
    for step in ladder:
        if value <= step:
            return step
    return None


STAGING_BUFFERS = 3  # pinned input buffers per graph, used in turn (see `_Graph.staging_buffer`)


@dataclass
class _Graph:
    """A captured step and its static inputs: ids, positions, slots, lengths, source rows
    and the block table are views of one device tensor, `packed`, so a step's inputs
    travel in one host-to-device copy."""

    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor
    input_ids: torch.Tensor
    source_rows: torch.Tensor
    logits: torch.Tensor
    prefix: PrefixGroups | None = None
    staging: list[torch.Tensor] | None = None
    turn: int = 0

    def staging_buffer(self) -> torch.Tensor:
        """The next pinned buffer of `packed`'s size. A copy from pinned memory runs after
        the host call returns, so a buffer is reused only after the steps since its last
        use were read back (async scheduling keeps one step in flight; three buffers leave
        a margin)."""
        if self.staging is None:
            self.staging = [torch.empty_like(self.packed, device="cpu").pin_memory() for _ in range(STAGING_BUFFERS)]
        self.turn = (self.turn + 1) % len(self.staging)
        return self.staging[self.turn]


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
        # [ids | positions | slots | lengths | source rows | block table], filled per step by one copy.
        packed = torch.zeros(5 * batch + batch * width, dtype=torch.long, device=device)
        input_ids, positions, slot_mapping, seq_lens, source_rows = packed[: 5 * batch].view(5, batch).unbind(0)
        block_tables = packed[5 * batch:].view(batch, width)
        packed.copy_(self._pad_inputs(batch, width, StepInputs(), []))
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
        return _Graph(graph, packed, input_ids, source_rows, logits, metadata.prefix_groups)

    def _pad_inputs(self, batch: int, width: int, inputs: StepInputs, rows: list[int]) -> torch.Tensor:
        """`packed`'s host image for these decode inputs and source rows, padded to the graph's
        batch and width: padding rows write to and attend only to the scratch block."""
        pad = batch - len(inputs.input_ids)
        scratch = self.scratch_block
        flat: list[int] = []
        for table in inputs.block_tables:
            flat += table
            flat += [scratch] * (width - len(table))
        flat += [scratch] * (width * pad)
        return torch.tensor(inputs.input_ids + [0] * pad + inputs.positions + [0] * pad + inputs.slots
                            + [scratch * self.block_size] * pad + inputs.seq_lens + [1] * pad
                            + rows + [0] * (batch - len(rows)) + flat, dtype=torch.long)

    @torch.inference_mode()
    def run(self, sequences: list[Sequence], shared_prefixes: list[SharedPrefix] | None = None,
            token_source: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """Logits [len(sequences), vocab] for a batch where every sequence computes one token.
        With `token_source` (tokens on the device, host rows), sequence i's input token is
        tokens[rows[i]]: a step launched before the previous step's tokens reached the host.
        Inputs travel through pinned memory in one copy, so launching never waits for the
        device, and the step adds two operations to the graph (the copy, the token gather)."""
        n = len(sequences)
        max_blocks = max(len(s.block_table) for s in sequences)
        key = (round_up(n, self.batch_ladder), round_up(max_blocks, self.width_ladder), bool(shared_prefixes))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        inputs = build_step_inputs(sequences, [1] * n, self.block_size, with_ids=token_source is None)
        rows = list(token_source[1]) if token_source is not None else []
        staging = entry.staging_buffer()
        staging.copy_(self._pad_inputs(key[0], key[1], inputs, rows))
        entry.packed.copy_(staging, non_blocking=True)
        if token_source is not None:
            torch.index_select(token_source[0], 0, entry.source_rows[:n], out=entry.input_ids[:n])
        if entry.prefix is not None:
            packed = pack_prefix_groups([g.members for g in shared_prefixes],
                                        [g.shared_tokens for g in shared_prefixes],
                                        key[0], "cpu", num_groups=entry.prefix.rows.shape[0])
            entry.prefix.rows.copy_(packed.rows.pin_memory().to(self.device, non_blocking=True))
            entry.prefix.prefix_lens.copy_(packed.prefix_lens.pin_memory().to(self.device, non_blocking=True))
            entry.prefix.row_starts.copy_(packed.row_starts.pin_memory().to(self.device, non_blocking=True))
        entry.graph.replay()
        return entry.logits[:n]
