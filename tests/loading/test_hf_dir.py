"""Hugging Face directories: config mapping, weights, tokenizer, eos ids and bad directories."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.tiny_models import CHATML, EOS_ID, make_tiny_model, tiny_config
from thinkwise.errors import ModelFormatError, UnsupportedArchitectureError
from thinkwise.loading import load_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def saved(request, tmp_path_factory):
    arch = request.param
    directory = tmp_path_factory.mktemp(f"hf-{arch}")
    model = make_tiny_model(arch, directory)
    return arch, directory, model


def test_config_fields(saved):
    arch, directory, model = saved
    c = load_model(str(directory), dtype=torch.float32).config
    hf = model.config
    assert c.architecture == arch
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (260, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads) == (4, 2)
    assert c.head_dim == (32 if arch == "qwen3" else 16)
    assert c.attention_bias == (arch == "qwen2")
    assert c.qk_norm == (arch == "qwen3")
    assert c.tie_word_embeddings is False
    assert c.rms_norm_eps == hf.rms_norm_eps and c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.max_position_embeddings == 512 and c.rope_scaling is None
    assert c.eos_token_ids == (EOS_ID,) and c.bos_token_id == 256


def test_weights_equal_transformers_state_dict(saved):
    _, directory, model = saved
    loaded = load_model(str(directory), dtype=torch.float32)
    reference = model.state_dict()
    assert set(loaded.weights) == set(reference)
    for name, tensor in reference.items():
        assert loaded.weights[name].dtype == torch.float32
        assert torch.equal(loaded.weights[name], tensor), name


def test_requested_dtype_applies_to_every_tensor(saved):
    _, directory, model = saved
    loaded = load_model(str(directory), dtype=torch.bfloat16)
    assert {t.dtype for t in loaded.weights.values()} == {torch.bfloat16}
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(loaded.weights[norm], model.state_dict()[norm].to(torch.bfloat16))


def test_tokenizer_and_chat_template(saved):
    _, directory, _ = saved
    loaded = load_model(str(directory), dtype=torch.float32)
    assert loaded.tokenizer is not None and loaded.chat_template == CHATML
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 259
    assert loaded.name == directory.name and loaded.source == str(directory)


def test_sharded_checkpoint(tmp_path):
    model = make_tiny_model("qwen3", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = load_model(str(tmp_path / "sharded"), dtype=torch.float32)
    assert len(loaded.extra["shards"]) > 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.weights[name], tensor), name
    assert loaded.tokenizer is None  # only weights were saved there


def test_missing_shard_is_a_format_error(tmp_path):
    model = make_tiny_model("llama", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    next((tmp_path / "sharded").glob("model-0000*.safetensors")).unlink()
    with pytest.raises(ModelFormatError, match="missing the weight shard"):
        load_model(str(tmp_path / "sharded"))


def test_truncated_safetensors_is_a_format_error(tmp_path):
    make_tiny_model("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="truncated or corrupted"):
        load_model(str(tmp_path))


def test_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    assert loaded.config.tie_word_embeddings
    assert "lm_head.weight" not in loaded.weights
    assert torch.equal(loaded.weights["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_llama3_rope_parameters(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    model = AutoModelForCausalLM.from_config(tiny_config("llama", rope_parameters=rope))
    model.save_pretrained(tmp_path)
    c = load_model(str(tmp_path), dtype=torch.float32).config
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}


def test_transformers4_style_config(tmp_path):
    """Top-level rope_theta and rope_scaling ("type" spelling), as older checkpoints have."""
    model = make_tiny_model("llama", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.pop("head_dim", None)
    raw.update(rope_theta=123456.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = load_model(str(tmp_path), dtype=torch.float32).config
    assert c.rope_theta == 123456.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.head_dim == 16
    del model


@pytest.mark.parametrize(
    ("generation", "config_eos", "expected"),
    [([7, EOS_ID], EOS_ID, (7, EOS_ID)), (9, EOS_ID, (9,)), (None, [3, 4], (3, 4)), (None, None, (EOS_ID,))],
)
def test_eos_ids_priority(tmp_path, generation, config_eos, expected):
    """generation_config.json, else config.json, else the tokenizer's eos (id 257)."""
    make_tiny_model("qwen2", tmp_path)
    gen_file = tmp_path / "generation_config.json"
    if generation is None:
        gen_file.unlink(missing_ok=True)
    else:
        gen_file.write_text(json.dumps({"eos_token_id": generation}))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["eos_token_id"] = config_eos
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_model(str(tmp_path)).config.eos_token_ids == expected


def test_directory_without_tokenizer_uses_chat_template_file(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer is None and loaded.chat_template is None
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert load_model(str(tmp_path)).chat_template == CHATML


def test_missing_config_json(tmp_path):
    make_tiny_model("llama", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_safetensors(tmp_path):
    make_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_empty_directory(tmp_path):
    with pytest.raises(ModelFormatError):
        load_model(str(tmp_path))


def test_broken_config_json(tmp_path):
    make_tiny_model("llama", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelFormatError, match="lacks the required key"):
        load_model(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "gpt2" in message and all(a in message for a in ("llama", "qwen2", "qwen3"))


@pytest.mark.parametrize("overrides", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}])
def test_llama_variants_thinkwise_cannot_run(tmp_path, overrides):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", **overrides)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError):
        load_model(str(tmp_path))
