"""The architecture-neutral description of a loaded model.

`ModelConfig` is what every loader (default model, Hugging Face directory, GGUF file)
produces and what `thinkwise.models` builds from (the registry there maps its
`architecture` to the model class and the translations that fill it); `LoadedModel` bundles it with the
weights (always under Hugging Face parameter names, so one model implementation serves
every source), the tokenizer and the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a name in thinkwise.models.registry.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on per-head q and k (Qwen3)
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # HF-style dict, e.g. {"rope_type": "llama3", ...}
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Sliding-window attention: a query sees only the last `sliding_window` positions, in
    # the layers `layer_types` marks "sliding_attention" (HF's names); with no layer_types,
    # in every layer. None: full attention everywhere.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Settings only one architecture reads (its model file documents them), e.g. Gemma 3's
    # query_pre_attn_scalar; JSON-able values, as the GGUF cache stores the config as JSON.
    options: dict[str, Any] = field(default_factory=dict)

    def layer_window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (None: full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names: "model.layers.0.self_attn.q_proj.weight", ...
    tokenizer: Any | None  # a transformers PreTrainedTokenizerBase, or None for id-only use
    chat_template: str | None
    source: str  # the file or directory it came from
    name: str  # the name it is served under
    extra: dict[str, Any] = field(default_factory=dict)


def hf_rope_settings(raw: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from a config.json in either style.

    transformers 5 writes `rope_parameters: {"rope_type": ..., "rope_theta": ..., <scaling
    keys>}`, or one such dict per layer type (`{"full_attention": {...}, "sliding_attention":
    {...}}`, read for `layer_type`); older files have top-level `rope_theta` and an optional
    `rope_scaling` dict.
    """
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:  # per-layer-type variant
        params = params[layer_type]
    params = dict(params) if isinstance(params, dict) else {}
    theta = raw.get("rope_theta", params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    scaling = raw.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        scaling["rope_type"] = rope_type
        if rope_type == "default" and set(scaling) == {"rope_type"}:
            scaling = None
    return float(theta), scaling
