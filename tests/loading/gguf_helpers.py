"""Writing small GGUF files the way llama.cpp's converter does, for loader tests.

`write_gguf_from_hf` takes a transformers model's state dict and writes it under GGUF
names, applying llama.cpp's q/k row permutation for the `llama` architecture and, for
`gemma3`, its tensor names and the +1 it adds to every norm weight, so a test can check
that thinkwise recovers the original tensors exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 3's four norms per layer (llama.cpp's tensor_mapping for gemma2/gemma3).
GEMMA3_LAYER = {
    **HF_TO_GGUF_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
HF_TO_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llamacpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem in HF_TO_GGUF_TOP:
        return f"{HF_TO_GGUF_TOP[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{(GEMMA3_LAYER if arch == 'gemma3' else HF_TO_GGUF_LAYER)[rest]}.{kind}"


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for HF's llama3 rope scaling (generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_gguf_from_hf(
    path: Path,
    arch: str,
    config,
    state_dict: dict[str, torch.Tensor],
    *,
    quantize: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    metadata: dict[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """Write `state_dict` as a GGUF of `arch`; returns the arrays written (by GGUF name)."""
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope["full_attention"]["rope_theta"] if arch == "gemma3" else rope["rope_theta"]))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    written: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        array = tensor.detach().float().numpy().copy()
        if arch == "gemma3" and name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the converter writes a tied output once, as token_embd
        gname = gguf_name(name, arch)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp's Gemma norms multiply by w, so it stores 1 + w
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            array = llamacpp_permute(array, heads, heads if ".attn_q." in gname else kv_heads)
        written[gname] = array
    written.update(extra_tensors or {})
    for gname, array in written.items():
        qtype = (quantize or {}).get(gname)
        if qtype is None:
            writer.add_tensor(gname, array)
        else:
            writer.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_minimal_gguf(path: Path, arch: str) -> None:
    """A syntactically valid GGUF of any architecture name with one tiny tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
