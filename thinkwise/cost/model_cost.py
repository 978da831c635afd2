"""Analytic cost of the work an engine step really did: FLOPs and bytes moved, per request.

From the model config: the dense matmul parameters a token passes through (q/k/v, o,
gate/up, down in every layer), the lm_head (applied only to rows that are sampled), the
attention work per (query, key) pair, all weight bytes (read once per step, shared by
every sequence in it) and KV bytes per token. `attribute_step` charges one step to the
requests it served:
- FLOPs: 2 x dense params per computed token; 4 x layers x heads x head_dim per (query
  token, visible key) for QK^T and PV, over the actual causal context; 2 x hidden x
  vocab per sampled row;
- bytes: the step's weight bytes split evenly over its sequences; each sequence's KV read
  over its context (its own prefix, and a shared prefix read once per group when cascade
  attention reads it once — split over the group's members) plus the KV it writes.
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
    dense_params: int  # matmul weights a token passes through (all layers, lm_head excluded)
    weight_bytes: int  # every weight tensor, read once per step
    kv_bytes_per_token: int  # K and V of one position, all layers

    @classmethod
    def from_config(cls, config, dtype: torch.dtype) -> ModelCostSpec:
        element = torch.empty((), dtype=dtype).element_size()
        h, layers = config.hidden_size, config.num_layers
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
        norms = layers * (2 * h + (2 * config.head_dim if config.qk_norm else 0)) + h
        embedding = config.vocab_size * h
        lm_head = 0 if config.tie_word_embeddings else config.vocab_size * h
        bias = layers * (q + 2 * kv) if config.attention_bias else 0
        return cls(
            num_layers=layers, num_heads=config.num_heads, head_dim=config.head_dim, hidden_size=h,
            vocab_size=config.vocab_size, dense_params=layers * per_layer,
            weight_bytes=(layers * per_layer + norms + embedding + lm_head + bias) * element,
            kv_bytes_per_token=2 * layers * config.num_kv_heads * config.head_dim * element,
        )

    def attention_flops(self, first: int, end: int) -> float:
        """QK^T and PV for query positions first..end-1, each seeing keys 0..itself."""
        pairs = (end * (end + 1) - first * (first + 1)) // 2
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * pairs

    def lm_head_flops(self) -> float:
        return 2.0 * self.hidden_size * self.vocab_size


def attribute_step(spec: ModelCostSpec, sequences, num_new_tokens, sample, prefix_groups=()) -> None:
    """Add one step's FLOPs and bytes to the `TokenCounts` of the requests it served."""
    if not sequences:
        return
    shared_read: dict[int, float] = {}  # index in the step -> its share of a group's prefix read
    shared_tokens: dict[int, int] = {}
    for group in prefix_groups:
        share = group.shared_tokens * spec.kv_bytes_per_token / len(group.members)
        for index in group.members:
            shared_read[index] = share
            shared_tokens[index] = group.shared_tokens
    weight_share = spec.weight_bytes / len(sequences)
    for index, (seq, n) in enumerate(zip(sequences, num_new_tokens)):
        counts = seq.request.counts
        end = seq.num_computed_tokens + n  # context after this step (called before the runner advances it)
        counts.flops += 2.0 * spec.dense_params * n + spec.attention_flops(end - n, end)
        if sample[index]:
            counts.flops += spec.lm_head_flops()
        own_context = end - shared_tokens.get(index, 0)
        counts.bytes_weights += weight_share
        counts.bytes_kv += shared_read.get(index, 0.0) + (own_context + n) * spec.kv_bytes_per_token
