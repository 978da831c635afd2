"""thinkwise's GGUF tensors against transformers' own GGUF loader on real files.

transformers dequantizes with the same gguf package and reverse-permutes llama q/k the
way llama.cpp requires, so every tensor must be bit-identical: for the llama-architecture
SmolLM2 this checks the un-permutation (9 query heads, 3 KV heads), for the default qwen2
model the name mapping, biases and the separate output matrix.
"""

from __future__ import annotations

import pytest
import torch

from thinkwise.loading import load_model
from thinkwise.loading.gguf_reading import fast_gguf_reader_for_transformers


def transformers_state_dict(path, dtype):
    from transformers import AutoModelForCausalLM

    # The faster reader only speeds up parsing; transformers' conversion is unchanged.
    with fast_gguf_reader_for_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.config, model.state_dict()


def test_smollm2_llama_weights_equal_transformers(smollm2_gguf, smollm2_cache):
    ours = load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(smollm2_cache))
    config, reference = transformers_state_dict(smollm2_gguf, torch.float32)
    assert config.tie_word_embeddings and ours.config.tie_word_embeddings
    reference.pop("lm_head.weight")  # tied: transformers exposes the embedding under both names
    assert set(ours.weights) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours.weights[name], tensor), name
    assert ours.config.num_heads == config.num_attention_heads == 9
    assert ours.config.num_kv_heads == config.num_key_value_heads == 3
    assert ours.config.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    assert ours.config.rope_theta == config.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_default_qwen2_weights_equal_transformers(default_gguf, default_loaded):
    config, reference = transformers_state_dict(default_gguf, torch.bfloat16)
    assert not config.tie_word_embeddings
    assert set(default_loaded.weights) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(default_loaded.weights[name], tensor), name
    assert default_loaded.config.eos_token_ids[0] == config.eos_token_id
