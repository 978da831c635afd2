"""Analytic cost of the work an engine step really did: FLOPs and bytes moved, per request.

`ModelCostSpec` holds what the model config fixes; `attribute_step` charges one step (the
sequences the scheduler picked, the tokens each computes, which rows are sampled) to the
`TokenCounts` of the requests it served. FLOPs count matmuls only, 2 per multiply-add
(norms, rotary, softmax, SiLU and bias adds are a fraction of a percent and left out):
- dense: 2 x (q/k/v + o + MLP parameters of every layer) per computed token; the MLP's
  matrix count (3 for a gated MLP) and the norms per layer come from the architecture's
  registry entry (`thinkwise.models.registry`), not from an assumed SwiGLU;
- attention: QK^T and PV, 2 x 2 x heads x head_dim per layer per (query token, visible
  key); a token at position i sees keys 0..i, or only the last `window` of them in a
  sliding-window layer, so a chunk computing positions a..b-1 costs the sum over exactly
  those positions (a cached prefix costs nothing);
- lm_head: 2 x hidden x vocab per sampled row only, as the runner computes logits only
  for a sequence's last token once all its pending tokens are computed.
Bytes:
- weights: the layers' weights and the final norm are read once per step and split
  evenly over the step's sequences; the lm_head matrix is read once in a step that
  samples any row and split over the sampled sequences; an embedding lookup reads one
  row per computed token (charged to its sequence), not the whole table;
- KV: bytes per token are K and V of every layer at the cache's dtype; an fp8 cache adds
  its scales (one fp32 per token, KV head, K and V: kernels/paged_attention.py), which the
  kernels read with the codes. Each sequence reads K and V of its whole context (cached
  prefix, earlier chunks and the tokens it writes this step) and writes its new tokens.
  When the step reports a shared-prefix group (cascade attention, see
  `thinkwise.engine.scheduler.SharedPrefix`) the group's shared tokens are read once for
  all members, split evenly over them.
  (Sliding-window layers are charged their whole context here, an upper bound: the
  kernels read only the window, but the paged cache still holds every position.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelCostSpec:
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    element_bytes: int  # bytes of one weight element at the engine's weight dtype
    dense_params: int  # matmul weights a token passes through (all layers, lm_head excluded)
    body_weight_bytes: int  # per-layer weights, biases and norms, and the final norm: read every step
    lm_head_bytes: int  # vocab x hidden: read in a step that samples any row
    weight_bytes: int  # every weight tensor stored (a tied lm_head counted once)
    kv_bytes_per_token: int  # K and V of one position, all layers
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for full attention

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> ModelCostSpec:
        """`dtype` stores the weights; `kv_dtype` the KV cache (default: the same; the fp8
        dtype counts its per-token, per-KV-head scales too)."""
        from thinkwise.kernels.paged_attention import FP8_KV_DTYPE, KV_SCALE_BYTES

        element = torch.empty((), dtype=dtype).element_size()
        kv_element = torch.empty((), dtype=kv_dtype or dtype).element_size()
        kv_vector = config.head_dim * kv_element + (KV_SCALE_BYTES if kv_dtype == FP8_KV_DTYPE else 0)
        # Imported here: the registry loads every model file and its Triton kernels, which
        # `import thinkwise` (this module included) must not do before TRITON_INTERPRET is set.
        from thinkwise.models import registry

        shape = registry.get(config.architecture).cost
        h, layers = config.hidden_size, config.num_layers
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        per_layer = h * (q + 2 * kv) + q * h + shape.mlp_matrices * h * config.intermediate_size
        bias = q + 2 * kv if config.attention_bias else 0
        norms = shape.norms_per_layer * h + (2 * config.head_dim if config.qk_norm else 0)
        windows = getattr(config, "layer_window", None)
        body = layers * (per_layer + bias + norms) + h
        table = config.vocab_size * h
        return cls(
            num_layers=layers, num_heads=config.num_heads, head_dim=config.head_dim, hidden_size=h,
            vocab_size=config.vocab_size, element_bytes=element, dense_params=layers * per_layer,
            body_weight_bytes=body * element, lm_head_bytes=table * element,
            weight_bytes=(body + table * (1 if config.tie_word_embeddings else 2)) * element,
            kv_bytes_per_token=2 * layers * config.num_kv_heads * kv_vector,
            layer_windows=tuple(windows(i) for i in range(layers)) if windows else (),
        )

    @property
    def embedding_row_bytes(self) -> int:
        return self.hidden_size * self.element_bytes

    def dense_flops(self, num_tokens: int) -> float:
        return 2.0 * self.dense_params * num_tokens

    def attention_flops(self, first: int, end: int) -> float:
        """QK^T and PV for query positions first..end-1, each seeing keys 0..itself (the
        last `window` of them in a windowed layer), summed over the layers."""
        full = (end * (end + 1) - first * (first + 1)) // 2
        if not any(self.layer_windows):
            return 4.0 * self.num_layers * self.num_heads * self.head_dim * full
        pairs = sum(full if w is None else _windowed_pairs(first, end, w) for w in self.layer_windows)
        return 4.0 * self.num_heads * self.head_dim * pairs

    def lm_head_flops(self) -> float:
        return 2.0 * self.hidden_size * self.vocab_size


def _windowed_pairs(first: int, end: int, window: int) -> int:
    """sum of min(p + 1, window) for p in first..end-1: keys seen under a sliding window."""
    ramp_end = max(first, min(end, window))  # positions below window - 1 see p + 1 keys
    ramp = (ramp_end * (ramp_end + 1) - first * (first + 1)) // 2
    return ramp + window * (end - ramp_end)


def attribute_step(spec: ModelCostSpec, sequences, num_new_tokens, sample, prefix_groups=()) -> None:
    """Add one step's FLOPs and bytes to the `TokenCounts` of the requests it served.

    Call it before the runner advances `num_computed_tokens`: sequence i computes positions
    num_computed_tokens .. num_computed_tokens + num_new_tokens[i] - 1, and `sample[i]` says
    whether its last row goes through the lm_head. `prefix_groups` (objects with `members`,
    indices into `sequences`, and `shared_tokens`) name the decode rows whose leading
    `shared_tokens` of KV the attention reads once for the whole group; leave it empty
    where every sequence reads its own context (the CPU path, plain paged attention).
    """
    if not sequences:
        return
    shared_read: dict[int, float] = {}  # index in the step -> its share of a group's prefix read
    shared_tokens: dict[int, int] = {}
    for group in prefix_groups:
        share = group.shared_tokens * spec.kv_bytes_per_token / len(group.members)
        for index in group.members:
            shared_read[index] = share
            shared_tokens[index] = group.shared_tokens
    body_share = spec.body_weight_bytes / len(sequences)
    num_sampled = sum(1 for s in sample if s)
    lm_head_share = spec.lm_head_bytes / num_sampled if num_sampled else 0.0
    for index, (seq, n) in enumerate(zip(sequences, num_new_tokens)):
        counts = seq.request.counts
        end = seq.num_computed_tokens + n  # context after this step
        counts.flops += spec.dense_flops(n) + spec.attention_flops(end - n, end)
        counts.bytes_weights += body_share + n * spec.embedding_row_bytes
        if sample[index]:
            counts.flops += spec.lm_head_flops()
            counts.bytes_weights += lm_head_share
        own_context = end - shared_tokens.get(index, 0)
        counts.bytes_kv += shared_read.get(index, 0.0) + (own_context + n) * spec.kv_bytes_per_token
