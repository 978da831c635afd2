"""Runs one engine step on the device: owns the KV cache and builds the flat batch.

Given the scheduled sequences and how many pending tokens each computes, the runner
lays their tokens out as one flat batch (single-token sequences first, which the
attention path batches), computes cache slots and block tables, applies pending
copy-on-write block copies, runs the model, and returns logits only for the rows that
will be sampled: a sequence's last token, once all its pending tokens are computed.

With an fp8 KV cache (`kv_cache_dtype=torch.float8_e4m3fn`) the codes keep the one-tensor
layout and a second tensor holds their scales, [layers, k/v, blocks, block_size, kv_heads]
(stored head-major, so one head's scales of a block are contiguous);
each layer gets `FP8KVCache` views of both, and a copy-on-write block copy moves codes
and scales together, so forks, the prefix cache and CUDA graphs see no difference.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from thinkwise.engine.block_manager import blocks_for
from thinkwise.engine.config import EngineConfig, stage_to_device
from thinkwise.engine.cuda_graphs import CudaGraphDecoder
from thinkwise.engine.scheduler import ScheduledBatch, SharedPrefix
from thinkwise.engine.sequence import Sequence
from thinkwise.engine.step_inputs import StepInputs, build_step_inputs
from thinkwise.kernels.paged_attention import (
    FP8_KV_DTYPE,
    KV_SCALE_DTYPE,
    AttentionMetadata,
    FP8KVCache,
    pack_prefix_groups,
)
from thinkwise.loading.config import ModelConfig

CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 256
ACTIVATION_RESERVE_BYTES = 512 << 20  # CUDA: free memory left for activations besides the KV cache


def kv_cache_budget_bytes(device: torch.device, config: EngineConfig) -> int:
    """Bytes the KV cache may take: a share of the GPU's free memory, or the CPU budget."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_utilization) - ACTIVATION_RESERVE_BYTES
    return int(config.kv_cache_memory_gb * (1 << 30))


def kv_cache_description(kv_cache_dtype: torch.dtype) -> str:
    """How the KV cache is stored, for run metadata: the dtype, or fp8 with its scales."""
    if kv_cache_dtype == FP8_KV_DTYPE:
        return "fp8_e4m3 (scale per token and KV head, fp32)"
    return str(kv_cache_dtype)


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
        cascade_min_shared_tokens: int | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        on_cuda = device.type == "cuda"
        # Cascade attention is a GPU kernel's saving (a shared prefix read once); on CPU the
        # reference attends each row whole, so shared prefixes are not used there.
        self.cascade_min_shared_tokens = cascade_min_shared_tokens if on_cuda else None
        # One tensor for the whole cache: [layers, k/v, blocks, block_size, kv_heads, head_dim],
        # plus one scratch block past the end that padded CUDA-graph rows may write into.
        self.kv_cache_dtype = kv_cache_dtype or dtype
        shape = (config.num_layers, 2, num_blocks + 1, block_size, config.num_kv_heads)
        self.kv_scales: torch.Tensor | None = None
        if self.kv_cache_dtype == FP8_KV_DTYPE:
            # Zeroed as bytes (0x00 is e4m3's +0): fills of fp8 tensors are not on every device.
            self.kv_cache = torch.zeros(*shape, config.head_dim, dtype=torch.uint8, device=device).view(FP8_KV_DTYPE)
            # Scales stored head-major ([.., blocks, kv_heads, block_size]) and viewed as [.., blocks,
            # block_size, kv_heads]: a decode tile reads one head's scales of a block side by side
            # (one or two sectors) instead of one strided 4-byte read per position.
            self.kv_scales = torch.zeros(*shape[:3], shape[4], shape[3], dtype=KV_SCALE_DTYPE,
                                         device=device).transpose(-1, -2)
            self.kv_caches = [tuple(FP8KVCache(self.kv_cache[i, j], self.kv_scales[i, j]) for j in (0, 1))
                              for i in range(config.num_layers)]
        else:
            self.kv_cache = torch.zeros(*shape, config.head_dim, dtype=self.kv_cache_dtype, device=device)
            self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(config.num_layers)]
        # Only the Triton decode kernel uses phi; the PyTorch path is exact without it.
        self.unified_max: float | None = None
        self.unified_max_stats: dict | None = None
        if unified_max_softmax and on_cuda:
            self.unified_max, self.unified_max_stats = self.calibrate_unified_max()
        self.graph_decoder: CudaGraphDecoder | None = None
        if cuda_graphs and on_cuda:
            self.graph_decoder = CudaGraphDecoder(
                model, self.kv_caches, block_size=block_size, scratch_block=num_blocks,
                max_blocks_per_seq=max(1, blocks_for(max_model_len, block_size)), device=device,
                max_batch=max_num_seqs, unified_max=self.unified_max,
            )

    def prefixes_read_once(self, batch: ScheduledBatch) -> list[SharedPrefix]:
        """The batch's shared prefixes that this device attends once for all their members
        (cascade attention): on CUDA those of at least `cascade_min_shared_tokens`, else none.
        The cost model charges their KV reads once too."""
        if self.cascade_min_shared_tokens is None:
            return []
        return [group for group in batch.shared_prefixes if group.shared_tokens >= self.cascade_min_shared_tokens]

    @torch.inference_mode()
    def calibrate_unified_max(self, seed: int = 0) -> tuple[float | None, dict | None]:
        """FlashDecoding++'s phi for this model: the median of the per-row maximum attention
        scores over calibration prompts (random token ids, so nothing is downloaded).

        Rows whose maximum lands more than the kernel's window away from phi are recomputed
        exactly at run time, so phi only has to be typical, not a bound. The cache is empty
        at load time; the calibration writes into its first blocks, which are later reused.
        """
        # Imported here: importing it defines Triton kernels, after TRITON_INTERPRET is set.
        from thinkwise.kernels.triton_decode_attention import UNIFIED_WINDOW

        generator = torch.Generator().manual_seed(seed)
        tokens = min(CALIBRATION_TOKENS, self.num_blocks * self.block_size // CALIBRATION_PROMPTS)
        if tokens < 2:
            return None, None
        blocks_per_prompt = blocks_for(tokens, self.block_size)
        recorded: list[torch.Tensor] = []
        for prompt in range(CALIBRATION_PROMPTS):
            ids = torch.randint(0, self.config.vocab_size, (tokens,), generator=generator).tolist()
            table = list(range(prompt * blocks_per_prompt, (prompt + 1) * blocks_per_prompt))
            calibration = SimpleNamespace(token_ids=ids, num_computed_tokens=0, block_table=table)
            inputs = build_step_inputs([calibration], [tokens], self.block_size)
            metadata = self.attention_metadata(inputs, num_decodes=0)
            metadata.score_recorder = recorded
            self.model(torch.tensor(inputs.input_ids, device=self.device),
                       torch.tensor(inputs.positions, device=self.device), self.kv_caches, metadata)
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
        if self.kv_scales is None:
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
            return
        codes = self.kv_cache.view(torch.uint8)  # byte copies: fp8 indexing is not on every device
        codes[:, :, dst] = codes[:, :, src]
        self.kv_scales[:, :, dst] = self.kv_scales[:, :, src]

    def attention_metadata(self, inputs: StepInputs, num_decodes: int) -> AttentionMetadata:
        """Device tensors of the step's slots, padded block tables and lengths."""
        device = self.device
        width = max(len(t) for t in inputs.block_tables)
        padded = [t + [0] * (width - len(t)) for t in inputs.block_tables]
        return AttentionMetadata(
            slot_mapping=torch.tensor(inputs.slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            seq_lens=torch.tensor(inputs.seq_lens, dtype=torch.long, device=device),
            query_start_loc=inputs.query_start_loc,
            seq_lens_host=inputs.seq_lens,
            num_decodes=num_decodes,
            block_size=self.block_size,
            unified_max=self.unified_max,
        )

    def prepare(self, sequences: list[Sequence], num_new_tokens: list[int],
                shared_prefixes: list[SharedPrefix] | None = None, token_source: torch.Tensor | None = None):
        """Flat inputs and attention metadata; returns the permutation used (decodes first).
        `shared_prefixes` are attended as cascade groups (`prefixes_read_once` picks them).
        `token_source` (one decode token per sequence, on the device) replaces the input ids
        of a step launched before its inputs reached the host."""
        order = sorted(range(len(sequences)), key=lambda i: num_new_tokens[i] != 1)
        inputs = build_step_inputs([sequences[i] for i in order], [num_new_tokens[i] for i in order],
                                   self.block_size, with_ids=token_source is None)
        device = self.device
        metadata = self.attention_metadata(inputs, num_decodes=sum(1 for n in num_new_tokens if n == 1))
        if shared_prefixes:
            row_of = {index: row for row, index in enumerate(order)}
            metadata.prefix_groups = pack_prefix_groups(
                [[row_of[i] for i in group.members] for group in shared_prefixes],
                [group.shared_tokens for group in shared_prefixes], metadata.num_decodes, device)
        if token_source is None:
            ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=device)
        else:
            assert metadata.num_decodes == len(sequences), "device-fed steps are pure decode steps"
            ids = token_source
        positions = torch.tensor(inputs.positions, dtype=torch.long, device=device)
        if device.type == "cuda":
            self._add_batched_prefill(metadata, positions)
        return ids, positions, metadata, order
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
        shared_prefixes: list[SharedPrefix] | None = None,
    ) -> torch.Tensor:
        """Run the step; logits [num_sampled, vocab] (fp32) in the order of `sequences`
        filtered by `sample`. `shared_prefixes` (from `prefixes_read_once`) are attended
        with cascade attention."""
        self.copy_blocks(copies)
        decoder = self.graph_decoder
        if (decoder is not None and all(n == 1 for n in num_new_tokens) and all(sample)
                and decoder.supports(len(sequences), max(len(s.block_table) for s in sequences))):
            return decoder.run(sequences, shared_prefixes)
        inputs, positions, metadata, order = self.prepare(sequences, num_new_tokens, shared_prefixes)
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
    def execute_fed(self, sequences: list[Sequence], copies: list[tuple[int, int]],
                    shared_prefixes: list[SharedPrefix], source: torch.Tensor, source_rows: list[int]) -> torch.Tensor:
        """A decode step whose input tokens are still on the device: sequence i reads
        `source[source_rows[i]]` (the tokens a step in flight sampled). Logits [n, vocab]."""
        self.copy_blocks(copies)
        if self.graph_decoder is not None:
            return self.graph_decoder.run(sequences, shared_prefixes, token_source=(source, source_rows))
        rows = stage_to_device(source_rows, torch.long, self.device)
        inputs, positions, metadata, _order = self.prepare(sequences, [1] * len(sequences), shared_prefixes,
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
