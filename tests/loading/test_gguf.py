"""GGUF loading: config from metadata, name mapping, q/k un-permutation, caching, bad files."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.loading.gguf_helpers import llama3_rope_factors, write_gguf_from_hf, write_minimal_gguf
from tests.tiny_models import tiny_config
from thinkwise.errors import ModelFormatError, ModelNotFoundError, ThinkwiseError, UnsupportedArchitectureError
from thinkwise.loading import gguf_file, load_model


# ---------------------------------------------------------------- the default model (qwen2)
@pytest.mark.slow
def test_default_model_config(default_loaded):
    c = default_loaded.config
    assert c.architecture == "qwen2"
    assert (c.num_layers, c.hidden_size, c.vocab_size) == (24, 896, 151936)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (14, 2, 64, 4864)
    assert c.rope_theta == 1_000_000.0 and c.rms_norm_eps == 1e-6
    assert c.max_position_embeddings == 32768
    assert c.attention_bias and not c.qk_norm
    assert not c.tie_word_embeddings  # this GGUF stores output.weight (Q8_0) apart from token_embd (Q5_0)
    assert c.bos_token_id == 151643
    assert c.eos_token_ids[0] == 151645 and set(c.eos_token_ids) == {151645, 151643}  # <|im_end|>, <|endoftext|>
    assert default_loaded.name == "default"


@pytest.mark.slow
def test_default_model_weights_tokenizer_and_template(default_loaded):
    w = default_loaded.weights
    assert w["model.embed_tokens.weight"].shape == (151936, 896)
    assert w["lm_head.weight"].shape == (151936, 896)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (128, 896)
    assert w["model.layers.23.self_attn.q_proj.bias"].shape == (896,)
    assert w["model.layers.5.mlp.down_proj.weight"].shape == (896, 4864)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert len(w) == 3 + 24 * 12  # embed, norm, lm_head + 12 tensors per layer (with q/k/v biases)
    tok = default_loaded.tokenizer
    assert tok is not None and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert "<|im_start|>" in default_loaded.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


@pytest.mark.slow
def test_default_model_second_load_reads_only_the_cache(default_loaded, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was parsed although the cache is complete")

    monkeypatch.setattr(gguf_file, "open_gguf", refuse)
    again = load_model("default")
    assert again.config == default_loaded.config
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight"):
        assert torch.equal(again.weights[name], default_loaded.weights[name])
    # "Only the cache" is shown by `refuse` above, not by a wall clock a loaded machine can miss.


# ---------------------------------------------------------------- SmolLM2 (llama, Q4_1)
def test_smollm2_config_and_cold_cache(smollm2_gguf, tmp_path):
    loaded = load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(tmp_path))
    c = loaded.config
    assert c.architecture == "llama"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and "lm_head.weight" not in loaded.weights
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert c.eos_token_ids[0] == 2 and c.bos_token_id == 1
    assert loaded.tokenizer is not None and loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert "<|im_start|>" in loaded.chat_template
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1"
    entry = tmp_path / "gguf"
    (cached,) = entry.iterdir()
    assert sorted(p.name for p in cached.iterdir()) == ["meta.json", "tokenizer", "weights-float32.safetensors"]
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporaries left behind

    # A second load in another dtype reuses config and tokenizer, dequantizes once more.
    half = load_model(str(smollm2_gguf), dtype=torch.float16, cache_dir=str(tmp_path))
    assert half.config == c and "parse_s" not in half.extra["timings"]
    assert half.weights["model.norm.weight"].dtype == torch.float16
    torch.testing.assert_close(half.weights["model.layers.1.mlp.up_proj.weight"].float(),
                               loaded.weights["model.layers.1.mlp.up_proj.weight"], rtol=1e-3, atol=1e-3)


def test_damaged_cache_entries_are_rebuilt(smollm2_gguf, smollm2_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_cache, cache)
    first = load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(cache))
    # Cached weights are memory-mapped: copy what we compare, then drop them before the
    # file is truncated in place below (touching a truncated mapping is a SIGBUS).
    expected = first.weights["model.layers.0.self_attn.q_proj.weight"].clone()
    del first
    (entry,) = (cache / "gguf").iterdir()
    weights_file = entry / "weights-float32.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    shutil.rmtree(entry / "tokenizer")
    again = load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(cache))
    assert torch.equal(again.weights["model.layers.0.self_attn.q_proj.weight"], expected)
    assert again.tokenizer is not None and (entry / "tokenizer").is_dir()
    assert "dequantize_s" in again.extra["timings"]


# ---------------------------------------------------------------- synthetic GGUFs
def tiny_hf_model(arch: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return config, model.state_dict()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_gguf_roundtrips_exactly(arch, tmp_path):
    """HF weights -> GGUF (with llama.cpp's q/k permutation for llama) -> thinkwise == HF."""
    config, state = tiny_hf_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf_from_hf(path, arch, config, state)
    loaded = load_model(str(path), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    assert set(loaded.weights) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded.weights[name], tensor), name
    c = loaded.config
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        64, 4, 2, 32 if arch == "qwen3" else 16)
    assert c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert c.vocab_size == 260 and c.intermediate_size == 128 and c.num_layers == 2
    assert c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0 and c.max_position_embeddings == 512
    assert loaded.tokenizer is None and loaded.chat_template is None  # no tokenizer metadata written


def test_synthetic_gemma3_gguf_loads_the_checkpoint_and_runs_like_transformers(tmp_path):
    """Gemma 3's GGUF names (four norms a layer), the +1 on its norms taken back, and the
    settings llama.cpp does not write (every 6th layer global, local rope base 10000,
    query scale 1/sqrt(head_dim)) restored as transformers' defaults have them."""
    from tests.models.model_checks import check_greedy
    from tests.tiny_models import TINY_WINDOW, make_tiny_model

    reference = make_tiny_model("gemma3", tmp_path / "hf", seed=13, num_hidden_layers=7, layer_types=None,
                                rope_parameters=None, query_pre_attn_scalar=32, tie_word_embeddings=True)
    path = tmp_path / "gemma3.gguf"
    write_gguf_from_hf(path, "gemma3", reference.config, reference.state_dict())
    loaded = load_model(str(path), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert set(loaded.weights) == set(state)
    for name, tensor in state.items():
        assert torch.allclose(loaded.weights[name], tensor, rtol=0, atol=1e-6), name  # w + 1 - 1 rounds
    c = loaded.config
    assert c.architecture == "gemma3" and c.sliding_window == TINY_WINDOW and c.tie_word_embeddings
    assert list(c.layer_types) == list(reference.config.layer_types)  # 5 local, global, local
    check_greedy(path, reference, max_tokens=12, cache_dir=str(tmp_path / "cache"))


def test_directory_with_one_gguf_loads_it(tmp_path):
    config, state = tiny_hf_model("qwen2")
    directory = tmp_path / "model"
    directory.mkdir()
    write_gguf_from_hf(directory / "tiny.gguf", "qwen2", config, state)
    loaded = load_model(str(directory), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    assert loaded.config.num_layers == 2 and loaded.source == str(directory / "tiny.gguf")
    shutil.copy(directory / "tiny.gguf", directory / "other.gguf")
    with pytest.raises(ModelFormatError, match="2 .gguf files"):
        load_model(str(directory), cache_dir=str(tmp_path / "cache"))


def test_llama_permutation_is_really_undone(tmp_path):
    """Guard against a vacuous pass: the file's raw q rows differ from HF's, ours match HF's."""
    config, state = tiny_hf_model("llama")
    path = tmp_path / "llama.gguf"
    written = write_gguf_from_hf(path, "llama", config, state)
    raw_q = written["blk.0.attn_q.weight"]
    assert not np.array_equal(raw_q, state["model.layers.0.self_attn.q_proj.weight"].numpy())
    loaded = load_model(str(path), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(loaded.weights["model.layers.0.self_attn.k_proj.weight"],
                       state["model.layers.0.self_attn.k_proj.weight"])


def test_quantized_tensors_and_tied_embeddings(tmp_path):
    config, state = tiny_hf_model("qwen2")
    del state["lm_head.weight"]
    path = tmp_path / "q8.gguf"
    q8 = gguf.GGMLQuantizationType.Q8_0
    write_gguf_from_hf(path, "qwen2", config, state, quantize={"blk.0.ffn_up.weight": q8})
    loaded = load_model(str(path), dtype=torch.bfloat16, cache_dir=str(tmp_path / "cache"))
    assert loaded.config.tie_word_embeddings
    up = loaded.weights["model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == torch.bfloat16 and up.shape == (128, 64)
    torch.testing.assert_close(up.float(), state["model.layers.0.mlp.up_proj.weight"], atol=0.02, rtol=0.02)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    config, state = tiny_hf_model("llama")
    factors = llama3_rope_factors(10000.0, 16, factor=8.0, low=1.0, high=4.0, old=64)
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2
    path = tmp_path / "llama3.gguf"
    write_gguf_from_hf(path, "llama", config, state, extra_tensors={"rope_freqs.weight": factors},
                       metadata={"llama.rope.scaling.original_context_length": 64})
    loaded = load_model(str(path), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    assert loaded.config.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert "rope_freqs.weight" not in str(list(loaded.weights))


def test_linear_rope_scaling_metadata(tmp_path):
    config, state = tiny_hf_model("qwen2")
    path = tmp_path / "linear.gguf"
    write_gguf_from_hf(path, "qwen2", config, state,
                       metadata={"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 4.0})
    loaded = load_model(str(path), dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    assert loaded.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_unknown_tensor_is_refused(tmp_path):
    config, state = tiny_hf_model("llama")
    path = tmp_path / "extra.gguf"
    write_gguf_from_hf(path, "llama", config, state,
                       extra_tensors={"blk.0.attn_output.bias": np.zeros(64, dtype=np.float32)})
    with pytest.raises(UnsupportedArchitectureError, match="attn_output.bias"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- errors
def test_unsupported_architecture_lists_supported_ones(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_minimal_gguf(path, "mamba")
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "mamba" in message and all(a in message for a in ("llama", "qwen2", "qwen3"))


@pytest.mark.parametrize("keep", [3, 100, 200_000, 2_000_000, -1000])
def test_truncated_gguf_is_a_format_error(smollm2_gguf, tmp_path, keep):
    """Cut inside the magic, the metadata, the tokenizer strings, and the tensor data."""
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(ModelFormatError) as info:
        load_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert "download it again" in str(info.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").rglob("*.safetensors"))


@pytest.mark.slow
def test_truncated_default_model_is_a_format_error(default_gguf, tmp_path):
    """Cut just after the 5.9 MB metadata block: the header parses, the tensor data is missing."""
    path = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(8 << 20))
    with pytest.raises(ModelFormatError):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"GGUF" + os.urandom(4096), b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_garbage_files_are_format_errors(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


def test_random_file_without_gguf_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(100))
    with pytest.raises(ModelFormatError, match="neither a .gguf file nor a model directory"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download Qwen/Qwen2.5-0.5B"):
        load_model("Qwen/Qwen2.5-0.5B")


def test_split_gguf_shard_is_refused(tmp_path):
    config, state = tiny_hf_model("llama")
    path = tmp_path / "model-00001-of-00002.gguf"
    write_gguf_from_hf(path, "llama", config, state, metadata={"split.count": 2})
    with pytest.raises(ModelFormatError, match="llama-gguf-split --merge"):
        load_model(str(path), cache_dir=str(tmp_path / "cache"))


def test_errors_are_thinkwise_errors():
    assert issubclass(ModelFormatError, ThinkwiseError) and issubclass(UnsupportedArchitectureError, ThinkwiseError)
