"""Gemma 3 text decoder (Hugging Face `Gemma3ForCausalLM`, model_type `gemma3_text`).

What sets it apart from the Llama family, all of it here:
- RMSNorm scales by (1 + weight), computed in fp32 and cast once at the end;
- the token embedding is multiplied by sqrt(hidden_size), rounded to the compute dtype
  first (transformers casts the scale to the embedding's dtype);
- GeGLU MLP: tanh-approximated GELU(gate) * up;
- RMSNorm on each head's q and k, and four norms per layer: before and after attention,
  before and after the MLP (the "after" norms apply to the sublayer output, before the
  residual add);
- local and global layers (`layer_types`): local ones attend within `sliding_window` and
  use their own rotary base (`rope_local_base_freq`, 10000), global ones the full context
  and `rope_theta` (with any rope scaling);
- scores scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5;
- optional tanh soft-capping of the final logits (`final_logit_softcapping`). Attention
  soft-capping is not applied: transformers' Gemma3ForCausalLM reads
  `attn_logit_softcapping` but never passes it to its attention (Gemma 3 replaced
  Gemma 2's soft-capping with q/k norm, and no released Gemma 3 sets it), so a config
  that sets it is run as transformers runs it, with a warning;
- tied embeddings by default.
Settings only Gemma has travel in `ModelConfig.options` (see `_gemma3_hf`). The registry
entry at the end says how config.json and llama.cpp's GGUF describe all of it; the
GGUF converter adds 1 to every norm weight, which `_gemma3_gguf_tensor` takes back.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from thinkwise.kernels.fused import qkv_rotary_cache
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.kernels.paged_attention import AttentionMetadata, paged_attention
from thinkwise.loading.config import ModelConfig, hf_rope_settings
from thinkwise.models.architecture import LLAMA_GGUF_TENSORS, Architecture, CostShape, Unsupported
from thinkwise.models.llama import load_decoder_weights
from thinkwise.models.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

SLIDING = "sliding_attention"
FULL = "full_attention"
# transformers' activation names this model implements -> thinkwise's gated activation.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}


class GemmaRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike Llama's, the scale multiplies in fp32 before the single cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        options = config.options
        self.local = config.layer_types[layer] == SLIDING
        self.window = config.layer_window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = float(options["query_pre_attn_scalar"]) ** -0.5
        self.qkv_proj = DispatchLinear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = DispatchLinear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # The (1 + w) norms run here, then the shared kernel does rotary and the cache write.
        q = self.q_norm(q.reshape(tokens, self.num_heads, self.head_dim)).reshape(tokens, self.q_size)
        k = self.k_norm(k.reshape(tokens, self.num_kv_heads, self.head_dim)).reshape(tokens, self.kv_size)
        k_cache, v_cache = kv_cache
        q = qkv_rotary_cache(torch.cat([q, k, v], dim=-1), cos, sin, None, None, 0.0, k_cache, v_cache,
                             metadata.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k_cache, v_cache, metadata, self.scale, self.window)
        return self.o_proj(out.reshape(tokens, self.q_size))


class Gemma3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.options["activation"]
        self.gate_up_proj = DispatchLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = DispatchLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_gated(x, self.activation))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, layer)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, hidden, ropes, kv_cache, metadata):
        cos, sin = ropes[self.self_attn.local]
        attended = self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, metadata)
        hidden = hidden + self.post_attention_layernorm(attended)
        fed = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(fed)


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        options = config.options
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self.rotary_local = RotaryEmbedding(config.head_dim, float(options["local_rope_theta"]),
                                            options.get("local_rope_scaling"), config.max_position_embeddings)
        self.lm_head = DispatchLinear(config.hidden_size, config.vocab_size, bias=False)
        self.final_softcap = options.get("final_logit_softcapping")
        self.has_local_layers = SLIDING in config.layer_types
        self._embed_scales: dict[torch.dtype, float] = {}

    def _embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to `dtype`, as transformers multiplies by it (a Python float,
        so CUDA graphs capture no host-to-device copy)."""
        if dtype not in self._embed_scales:
            self._embed_scales[dtype] = torch.tensor(math.sqrt(self.config.hidden_size)).to(dtype).item()
        return self._embed_scales[dtype]

    def forward(self, input_ids, positions, kv_caches, metadata: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [num_tokens, hidden] for a flat batch of tokens."""
        dtype = self.norm.weight.dtype  # the compute dtype (the table may be stored narrower)
        hidden = self.embed_tokens(input_ids).to(dtype) * self._embed_scale(dtype)
        ropes = {False: self.rotary.cos_sin(positions, dtype)}
        if self.has_local_layers:
            ropes[True] = self.rotary_local.cos_sin(positions, dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, ropes, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_decoder_weights(self, weights, layer_norms=("input_layernorm", "post_attention_layernorm",
                                                         "pre_feedforward_layernorm", "post_feedforward_layernorm"))


# ----------------------------------------------------------------------------- registry entry


def _layer_types(raw: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    types = raw.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(raw.get("sliding_window_pattern") or 6)
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise Unsupported(f"its layer_types {types!r} are not {num_layers} of {SLIDING!r}/{FULL!r}")
    return tuple(types)


def _gemma3_hf(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise Unsupported(f"it uses the {act!r} activation")
    if raw.get("attention_bias"):
        raise Unsupported("it has attention_bias=true (biases on q/k/v/o)")
    if raw.get("use_bidirectional_attention"):
        raise Unsupported("it uses bidirectional attention (an embedding model, not a causal LM)")
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    if isinstance(params.get(FULL), dict) or "rope_theta" in raw or "rope_theta" in params:
        theta, scaling = hf_rope_settings(raw, FULL)
    else:  # Gemma3TextConfig's default global base
        theta, scaling = 1_000_000.0, hf_rope_settings(raw, FULL)[1]
    if isinstance(params.get(SLIDING), dict):
        local = {"rope_theta": raw.get("rope_local_base_freq", 10000.0), **params[SLIDING]}
        local_theta, local_scaling = hf_rope_settings({"rope_parameters": local})
    else:
        local_theta, local_scaling = float(raw.get("rope_local_base_freq", 10000.0)), None
    window = raw.get("sliding_window", 4096)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise Unsupported(f"its sliding_window is {window!r}, not a positive integer")
    softcaps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise Unsupported(f"its {key} is {value!r}, not a positive number or null")
            softcaps[key] = float(value)
    if "attn_logit_softcapping" in softcaps:
        logger.warning(
            "this Gemma 3 config sets attn_logit_softcapping=%s; like transformers' Gemma3ForCausalLM, "
            "thinkwise does not apply it (Gemma 3 attention is not soft-capped)", softcaps.pop("attn_logit_softcapping"))
    head_dim = raw.get("head_dim") or 256  # Gemma3TextConfig's default, not hidden / heads
    return {
        **fields,
        "head_dim": int(head_dim),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", True)),
        "max_position_embeddings": int(raw.get("max_position_embeddings", 131072)),
        "sliding_window": window,
        "layer_types": _layer_types(raw, fields["num_layers"]),
        "qk_norm": True,
        "options": {
            "activation": _ACTIVATIONS[act],
            "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar", 256)),
            "local_rope_theta": local_theta,
            "local_rope_scaling": local_scaling,
            **softcaps,
        },
    }


def _gemma3_gguf(get, fields: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp writes the window but neither the layer pattern nor the local rope base
    nor query_pre_attn_scalar; it hard-codes them, and so does this (its llama-model.cpp:
    every 6th layer global, local base 10000, scale 1/sqrt(head_dim) except the 27B's
    1/sqrt(hidden / heads)). A per-layer pattern array, where a newer file has one, wins."""
    window = get("attention.sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise Unsupported(f"its attention.sliding_window is {window!r}, not a positive integer")
    num_layers = fields["num_layers"]
    pattern = get("attention.sliding_window_pattern")
    if pattern is None or (isinstance(pattern, int) and pattern >= 1):  # every `pattern`-th layer global
        layer_types = tuple(SLIDING if (i + 1) % (pattern or 6) else FULL for i in range(num_layers))
    elif isinstance(pattern, list) and len(pattern) == num_layers:
        layer_types = tuple(SLIDING if swa else FULL for swa in pattern)
    else:
        raise Unsupported(f"its attention.sliding_window_pattern {pattern!r} is not one flag per layer ({num_layers})")
    scalar = fields["hidden_size"] // fields["num_heads"] if num_layers == 62 else fields["head_dim"]
    return {
        **fields,
        "sliding_window": None if window is None else int(window),
        "layer_types": layer_types,
        "qk_norm": True,
        "options": {"activation": "gelu_tanh", "query_pre_attn_scalar": float(scalar),
                    "local_rope_theta": 10000.0, "local_rope_scaling": None},
    }


def _gemma3_gguf_tensor(hf_name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    # llama.cpp's converter stores Gemma norms as 1 + w (its RMSNorm multiplies by w).
    return array - 1.0 if hf_name.endswith("norm.weight") else array


GEMMA3 = Architecture(
    name="gemma3", model_class=Gemma3Model, description="Gemma 3 text models, local/global sliding window",
    hf_model_types=("gemma3_text",), hf_config=_gemma3_hf,
    gguf_architecture="gemma3", gguf_config=_gemma3_gguf,
    gguf_tensors={
        **LLAMA_GGUF_TENSORS,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    gguf_bias_parts=(),
    gguf_tensor=_gemma3_gguf_tensor,
    cost=CostShape(mlp_matrices=3, norms_per_layer=4),
)
