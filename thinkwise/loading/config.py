"""The architecture-neutral description of a loaded model.

`ModelConfig` is what every loader (default model, Hugging Face directory, GGUF file)
produces and what `thinkwise.models` builds from; `LoadedModel` bundles it with the
weights (always under Hugging Face parameter names, so one model implementation serves
every source), the tokenizer and the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
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


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names: "model.layers.0.self_attn.q_proj.weight", ...
    tokenizer: Any | None  # a transformers PreTrainedTokenizerBase, or None for id-only use
    chat_template: str | None
    source: str  # the file or directory it came from
    name: str  # the name it is served under
    extra: dict[str, Any] = field(default_factory=dict)
