"""The Llama family decoder: Llama 2/3, SmolLM2, Qwen2/Qwen2.5, Qwen3 and Mistral.

One implementation covers them because they differ only in switches the config
carries: bias on the q/k/v projections (Qwen2), RMSNorm on each head's q and k before
rotary (Qwen3), an explicit head_dim (Qwen3, Mistral), tied embeddings, rope scaling,
and a sliding attention window in every layer (Mistral). The registry entries at the end
say how each member's config.json and GGUF files map onto those switches.
Projections that read the same input are fused (q/k/v into one matrix, gate/up into
another) so a step runs two large matmuls instead of five; `load_weights` takes the
Hugging Face names and does the fusing. The forward pass takes a flat batch of tokens
and an `AttentionMetadata`; the KV cache tensors are handed in by the runner.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from thinkwise.errors import ModelFormatError
from thinkwise.kernels.fused import add_rms_norm, qkv_rotary_cache
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.kernels.paged_attention import AttentionMetadata, paged_attention
from thinkwise.loading.config import ModelConfig
from thinkwise.models.architecture import Architecture, Unsupported
from thinkwise.models.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: the norm of x. With it: (norm(x + residual), x + residual),
        one fused kernel on GPU. Normalise in fp32 and scale after casting back, exactly
        as Hugging Face does, so bf16 runs round the same way the reference does."""
        if residual is None:
            return add_rms_norm(x, None, self.weight, self.eps)[0]
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.window = config.layer_window(layer)  # None: full attention (no extra work)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = DispatchLinear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = DispatchLinear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        k_cache, v_cache = kv_cache
        # q/k norm (Qwen3), rotary, and the K/V cache write: one kernel on GPU.
        q = qkv_rotary_cache(
            self.qkv_proj(hidden), cos, sin,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 0.0,
            k_cache, v_cache, metadata.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim,
        )
        out = paged_attention(q, k_cache, v_cache, metadata, self.scale, self.window)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = DispatchLinear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = DispatchLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU(gate) * up: in the gate/up GEMM's epilogue where the Triton GEMM runs.
        return self.down_proj(self.gate_up_proj.forward_gated(x, "silu"))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, residual, cos, sin, kv_cache, metadata):
        """The residual stream is carried separately (None before the first layer) so each
        residual add fuses with the norm that follows it; the sums are the same as
        `hidden = hidden + sublayer(norm(hidden))`."""
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(normed, cos, sin, kv_cache, metadata)
        normed, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(normed), residual


def weight_copier(model: nn.Module, weights: dict[str, torch.Tensor]):
    """(take, put) for a model's load_weights: take(HF name) fetches a checkpoint tensor,
    put(parameter name, tensor) copies it in; both name what is missing or misshapen."""
    params = dict(model.named_parameters())

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ModelFormatError(f"weight {name!r} is missing from the model files; the download may be incomplete")
        return weights[name]

    def put(param_name: str, tensor: torch.Tensor) -> None:
        param = params[param_name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ModelFormatError(
                f"weight for {param_name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}; "
                "the config and the weights disagree"
            )
        param.copy_(tensor)

    return take, put


def load_decoder_weights(model: nn.Module, weights: dict[str, torch.Tensor],
                         layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")) -> None:
    """Copy Hugging Face-named tensors into a Llama-shaped decoder (`embed_tokens`, `layers.i`
    with `self_attn.qkv_proj/o_proj[/q_norm/k_norm]` and `mlp.gate_up_proj/down_proj`, `norm`,
    `lm_head`), fusing q/k/v and gate/up; `layer_norms` are each layer's norms by their Hugging
    Face names (Gemma has four)."""
    config = model.config
    take, put = weight_copier(model, weights)
    put("embed_tokens.weight", take("model.embed_tokens.weight"))
    put("norm.weight", take("model.norm.weight"))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        put("lm_head.weight", take("lm_head.weight"))
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        put(dst + "self_attn.qkv_proj.weight", torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"]))
        if config.attention_bias:
            put(dst + "self_attn.qkv_proj.bias", torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"]))
        put(dst + "self_attn.o_proj.weight", take(attn + "o_proj.weight"))
        if config.qk_norm:
            put(dst + "self_attn.q_norm.weight", take(attn + "q_norm.weight"))
            put(dst + "self_attn.k_norm.weight", take(attn + "k_norm.weight"))
        mlp = src + "mlp."
        put(dst + "mlp.gate_up_proj.weight", torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]))
        put(dst + "mlp.down_proj.weight", take(mlp + "down_proj.weight"))
        for norm in layer_norms:
            put(dst + f"{norm}.weight", take(src + f"{norm}.weight"))


class LlamaFamilyModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self.lm_head = DispatchLinear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [num_tokens, hidden] for a flat batch of tokens."""
        # The norms' dtype is the compute dtype; the table may be stored narrower (LayerCast).
        hidden = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, metadata)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_decoder_weights(self, weights)


# ----------------------------------------------------------------------------- registry entries


def _plain_gated_silu_mlp(raw: dict[str, Any]) -> None:
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise Unsupported(f"it uses the {act!r} activation")
    if raw.get("mlp_bias"):
        raise Unsupported("it has biases on the MLP projections (mlp_bias)")


def _no_output_bias(raw: dict[str, Any]) -> None:
    if raw.get("attention_bias"):  # Llama/Qwen3 then put a bias on o_proj as well
        raise Unsupported("it has attention_bias=true (a bias on o_proj too)")


def _no_qwen_window(raw: dict[str, Any]) -> None:
    # Qwen2/Qwen3 window only the layers from max_window_layers on; not implemented.
    if raw.get("use_sliding_window"):
        raise Unsupported("it enables sliding-window attention (use_sliding_window)")


def _llama_hf(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    _plain_gated_silu_mlp(raw)
    _no_output_bias(raw)
    return fields


def _qwen2_hf(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    _plain_gated_silu_mlp(raw)
    _no_qwen_window(raw)
    return {**fields, "attention_bias": True}  # Qwen2 hard-codes bias on q/k/v (and none on o_proj)


def _qwen3_hf(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    _plain_gated_silu_mlp(raw)
    _no_output_bias(raw)
    _no_qwen_window(raw)
    return {**fields, "qk_norm": True}


def _mistral_hf(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    _plain_gated_silu_mlp(raw)
    window = raw.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise Unsupported(f"its sliding_window is {window!r}, not a positive integer or null")
    return {**fields, "sliding_window": window}


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of q/k projection rows (weights and biases).

    The converter reshapes rows as (n_head, 2, head_dim/2) and swaps the last two axes, so
    each head's two rotary halves end up interleaved. Reading rows as (n_head, head_dim/2,
    2) and swapping back restores them; for k, n_head is the number of KV heads (llama.cpp
    permutes k with n_head_kv). Same as transformers' `_reverse_permute_weights`.
    """
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_gguf_tensor(hf_name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    # llama.cpp permutes the q/k rows of `llama` models (not of qwen2/qwen3) for its rotary layout.
    if ".self_attn.q_proj." in hf_name:
        return unpermute_qk(array, config.num_heads)
    if ".self_attn.k_proj." in hf_name:
        return unpermute_qk(array, config.num_kv_heads)
    return array


LLAMA = Architecture(
    name="llama", model_class=LlamaFamilyModel, description="Llama 2/3, SmolLM2",
    hf_model_types=("llama",), hf_config=_llama_hf,
    gguf_architecture="llama", gguf_tensor=_llama_gguf_tensor,
)
QWEN2 = Architecture(
    name="qwen2", model_class=LlamaFamilyModel, description="Qwen2, Qwen2.5",
    hf_model_types=("qwen2",), hf_config=_qwen2_hf, gguf_architecture="qwen2",
)
QWEN3 = Architecture(
    name="qwen3", model_class=LlamaFamilyModel, description="Qwen3",
    hf_model_types=("qwen3",), hf_config=_qwen3_hf, gguf_architecture="qwen3",
)
# llama.cpp converts Mistral checkpoints to its "llama" architecture (so such GGUFs load as
# llama); only Hugging Face directories arrive as "mistral", with their sliding window.
MISTRAL = Architecture(
    name="mistral", model_class=LlamaFamilyModel, description="Mistral, with its sliding window",
    hf_model_types=("mistral",), hf_config=_mistral_hf,
)
