"""Runs one engine step on the device: owns the KV cache and builds the flat batch.

Given the scheduled sequences and how many pending tokens each computes, the runner
lays their tokens out as one flat batch (single-token sequences first, which the
attention path batches), computes cache slots and block tables, applies pending
copy-on-write block copies, runs the model, and returns logits only for the rows that
will be sampled: a sequence's last token, once all its pending tokens are computed.
"""

from __future__ import annotations

import torch

from thinkwise.engine.config import stage_to_device
from thinkwise.engine.scheduler import PrefixGroup
from thinkwise.engine.sequence import Sequence
from thinkwise.kernels import paged_attention
from thinkwise.kernels.paged_attention import AttentionMetadata, pack_prefix_groups
from thinkwise.loading.config import ModelConfig

CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 256


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int = 0,
        cuda_graphs: bool = True,
        max_num_seqs: int = 256,
        unified_max_softmax: bool = False,
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One tensor for the whole cache: [layers, k/v, blocks, block_size, kv_heads, head_dim],
        # plus one scratch block past the end that padded CUDA-graph rows may write into.
        self.kv_cache = torch.zeros(
            config.num_layers, 2, num_blocks + 1, block_size, config.num_kv_heads, config.head_dim,
            dtype=dtype, device=device,
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(config.num_layers)]
        # Only the Triton decode kernel uses phi; the PyTorch path is exact without it.
        self.unified_max: float | None = None
        self.unified_max_stats: dict | None = None
        if unified_max_softmax and device.type == "cuda":
            self.unified_max, self.unified_max_stats = self.calibrate_unified_max()
        self.graph_decoder = None
        if cuda_graphs and device.type == "cuda":
            from thinkwise.engine.cuda_graphs import CudaGraphDecoder

            self.graph_decoder = CudaGraphDecoder(
                model, self.kv_caches, block_size=block_size, scratch_block=num_blocks,
                max_blocks_per_seq=max(1, (max_model_len + block_size - 1) // block_size), device=device,
                max_batch=max_num_seqs, unified_max=self.unified_max,
            )

    @torch.inference_mode()
    def calibrate_unified_max(self, seed: int = 0) -> tuple[float | None, dict | None]:
        """FlashDecoding++'s phi for this model: the median of the per-row maximum attention
        scores over calibration prompts (random token ids, so nothing is downloaded).

        Rows whose maximum lands more than the kernel's window away from phi are recomputed
        exactly at run time, so phi only has to be typical, not a bound. The cache is empty
        at load time; the calibration writes into its first blocks, which are later reused.
        """
        from thinkwise.kernels.triton_decode_attention import UNIFIED_WINDOW

        generator = torch.Generator().manual_seed(seed)
        tokens = min(CALIBRATION_TOKENS, self.num_blocks * self.block_size // CALIBRATION_PROMPTS)
        if tokens < 2:
            return None, None
        blocks_per_prompt = (tokens + self.block_size - 1) // self.block_size
        paged_attention.score_recorder = recorded = []
        try:
            for prompt in range(CALIBRATION_PROMPTS):
                ids = torch.randint(0, self.config.vocab_size, (tokens,), generator=generator)
                table = list(range(prompt * blocks_per_prompt, (prompt + 1) * blocks_per_prompt))
                positions = torch.arange(tokens)
                metadata = AttentionMetadata(
                    slot_mapping=torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size
                                               for p in range(tokens)], device=self.device),
                    block_tables=torch.tensor([table], device=self.device),
                    seq_lens=torch.tensor([tokens], device=self.device),
                    query_start_loc=[0, tokens], seq_lens_host=[tokens], num_decodes=0, block_size=self.block_size,
                )
                self.model(ids.to(self.device), positions.to(self.device), self.kv_caches, metadata)
        finally:
            paged_attention.score_recorder = None
        row_max = torch.cat(recorded)
        phi = float(row_max.median())
        low, high = UNIFIED_WINDOW.get(self.dtype, (-8.0, 10.0))
        outside = ((row_max - phi < low) | (row_max - phi > high)).float().mean().item()
        quantiles = torch.quantile(row_max[:: max(1, row_max.numel() // 100_000)],
                                   torch.tensor([0.0001, 0.5, 0.9999])).tolist()
        stats = {"phi": round(phi, 4), "window": [low, high], "calibration_rows": row_max.numel(),
                 "row_max_q0.0001_q0.5_q0.9999": [round(q, 3) for q in quantiles],
                 "calibration_rows_outside_window": outside}
        return phi, stats

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = stage_to_device([s for s, _ in copies], torch.long, self.device)
        dst = stage_to_device([d for _, d in copies], torch.long, self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def prepare(self, sequences: list[Sequence], num_new_tokens: list[int],
                prefix_groups: list[PrefixGroup] | None = None, token_source: torch.Tensor | None = None):
        """Flat inputs and attention metadata; returns the permutation used (decodes first).
        `token_source` (one decode token per sequence, on the device) replaces the input ids
        of a step launched before its inputs reached the host."""
        order = sorted(range(len(sequences)), key=lambda i: num_new_tokens[i] != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for i in order:
            seq, n = sequences[i], num_new_tokens[i]
            begin = seq.num_computed_tokens
            end = begin + n
            if token_source is None:
                input_ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            starts.append(starts[-1] + n)
            seq_lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            query_start_loc=starts,
            seq_lens_host=seq_lens,
            num_decodes=sum(1 for i in order if num_new_tokens[i] == 1),
            block_size=bs,
            unified_max=self.unified_max,
        )
        if prefix_groups:
            row_of = {index: row for row, index in enumerate(order)}
            metadata.prefix_groups = pack_prefix_groups(
                [[row_of[i] for i in group.members] for group in prefix_groups],
                [group.shared_tokens for group in prefix_groups], metadata.num_decodes, device)
        if token_source is None:
            inputs = torch.tensor(input_ids, dtype=torch.long, device=device)
        else:
            assert metadata.num_decodes == len(sequences), "device-fed steps are pure decode steps"
            inputs = token_source
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        if device.type == "cuda":
            self._add_batched_prefill(metadata, pos)
        return inputs, pos, metadata, order

    # The mask is [prefill tokens x context tokens]; past this many elements the per-sequence
    # loop is cheaper than materialising it.
    MAX_PREFILL_MASK = 1 << 28

    def _add_batched_prefill(self, metadata: AttentionMetadata, positions: torch.Tensor) -> None:
        nd, count = metadata.num_decodes, metadata.num_seqs
        if count - nd < 2:
            return  # one prefill sequence: the per-sequence path is already a single call
        starts = metadata.query_start_loc
        lens = metadata.seq_lens_host[nd:]
        num_queries = starts[-1] - starts[nd]
        if num_queries * sum(lens) > self.MAX_PREFILL_MASK:
            return
        device = self.device
        bs = self.block_size
        slots = []
        for row, length in zip(range(nd, count), lens):
            blocks = metadata.block_tables[row, : (length + bs - 1) // bs]
            slots.append((blocks[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:length])
        query_seq = torch.repeat_interleave(
            torch.arange(count - nd, device=device),
            torch.tensor([starts[i + 1] - starts[i] for i in range(nd, count)], device=device),
        )
        key_seq = torch.repeat_interleave(torch.arange(count - nd, device=device), torch.tensor(lens, device=device))
        key_pos = torch.cat([torch.arange(length, device=device) for length in lens])
        query_pos = positions[starts[nd]:]
        metadata.prefill_context_slots = torch.cat(slots)
        metadata.prefill_mask = (query_seq[:, None] == key_seq[None, :]) & (key_pos[None, :] <= query_pos[:, None])

    @torch.inference_mode()
    def execute(
        self, sequences: list[Sequence], num_new_tokens: list[int], sample: list[bool], copies: list[tuple[int, int]],
        prefix_groups: list[PrefixGroup] | None = None,
    ) -> torch.Tensor:
        """Run the step; logits [num_sampled, vocab] (fp32) in the order of `sequences`
        filtered by `sample`. `prefix_groups` (decode rows sharing prompt blocks) turn on
        cascade attention for them."""
        self.copy_blocks(copies)
        decoder = self.graph_decoder
        if (decoder is not None and all(n == 1 for n in num_new_tokens) and all(sample)
                and decoder.supports(len(sequences), max(len(s.block_table) for s in sequences))):
            return decoder.run(sequences, prefix_groups)
        inputs, positions, metadata, order = self.prepare(sequences, num_new_tokens, prefix_groups)
        hidden = self.model(inputs, positions, self.kv_caches, metadata)
        # Row of each sequence's last token in the flat (reordered) batch.
        last_row = {}
        for slot, i in enumerate(order):
            last_row[i] = metadata.query_start_loc[slot + 1] - 1
        rows = [last_row[i] for i in range(len(sequences)) if sample[i]]
        if not rows:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        selected = hidden.index_select(0, torch.tensor(rows, device=self.device))
        return self.model.compute_logits(selected)

    @torch.inference_mode()
    def execute_fed(self, sequences: list[Sequence], copies: list[tuple[int, int]], prefix_groups: list[PrefixGroup],
                    source: torch.Tensor, source_rows: list[int]) -> torch.Tensor:
        """A decode step whose input tokens are still on the device: sequence i reads
        `source[source_rows[i]]` (the tokens a step in flight sampled). Logits [n, vocab]."""
        self.copy_blocks(copies)
        if self.graph_decoder is not None:
            return self.graph_decoder.run(sequences, prefix_groups, token_source=(source, source_rows))
        rows = stage_to_device(source_rows, torch.long, self.device)
        inputs, positions, metadata, _order = self.prepare(sequences, [1] * len(sequences), prefix_groups,
                                                           token_source=source.index_select(0, rows))
        hidden = self.model(inputs, positions, self.kv_caches, metadata)
        return self.model.compute_logits(hidden)

    def can_feed(self, sequences: list[Sequence]) -> bool:
        """Whether a device-fed decode step of these sequences runs without a host sync: on
        CUDA only as a captured graph (the eager path stages its inputs synchronously)."""
        if self.device.type != "cuda":
            return True
        decoder = self.graph_decoder
        return decoder is not None and decoder.supports(
            len(sequences), max((s.num_computed_tokens + self.block_size) // self.block_size for s in sequences))
