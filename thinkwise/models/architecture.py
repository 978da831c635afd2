"""What a model file declares about its architecture: the `Architecture` entry type.

Kept apart from `registry` (which imports every model file) so a model file can import
these without importing its siblings. See `thinkwise.models.registry` for what each field
is used for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# llama.cpp's per-layer tensor names -> Hugging Face's, as the Llama family uses them.
LLAMA_GGUF_TENSORS: Mapping[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class Unsupported(Exception):
    """Raised by an entry's config translation: the file asks for something the model
    class cannot run. The message names that thing; the loader adds where it came from."""


def _no_fields(raw: Any, fields: dict[str, Any]) -> dict[str, Any]:
    return fields


def _same_array(hf_name: str, array: np.ndarray, config: Any) -> np.ndarray:
    return array


@dataclass(frozen=True)
class CostShape:
    """What the analytic cost model needs beyond the config's sizes."""

    mlp_matrices: int = 3  # gate, up, down of a gated MLP (SwiGLU, GeGLU)
    norms_per_layer: int = 2  # hidden-size norm vectors read per layer


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture
    model_class: type  # built as model_class(config); has load_weights and compute_logits
    description: str  # for the supported list, e.g. "Llama 2/3, SmolLM2"
    hf_model_types: tuple[str, ...] = ()  # config.json "model_type" values it answers to
    # (raw config.json, common fields) -> fields: adds/overrides ModelConfig fields, raises Unsupported.
    hf_config: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = _no_fields
    gguf_architecture: str | None = None  # GGUF "general.architecture"; None: no GGUF support
    # (metadata getter key -> value under "{arch}.", common fields) -> fields.
    gguf_config: Callable[[Callable[..., Any], dict[str, Any]], dict[str, Any]] = _no_fields
    gguf_tensors: Mapping[str, str] = field(default_factory=lambda: LLAMA_GGUF_TENSORS)
    gguf_bias_parts: tuple[str, ...] = ("attn_q", "attn_k", "attn_v")  # GGUF parts that may carry a bias
    # (HF name, dequantized array, ModelConfig) -> array: undoes what llama.cpp's converter did.
    gguf_tensor: Callable[[str, np.ndarray, Any], np.ndarray] = _same_array
    cost: CostShape = CostShape()
