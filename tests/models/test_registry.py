"""The model registry: the one place the architectures, and every list of them, come from."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.tiny_models import make_tiny_model
from thinkwise.errors import UnsupportedArchitectureError
from thinkwise.loading import SUPPORTED_ARCHITECTURES as LOADING_LIST
from thinkwise.loading.hf_dir import load_hf_dir
from thinkwise.models import SUPPORTED_ARCHITECTURES, build_model, registry
from thinkwise.models.architecture import Architecture
from thinkwise.models.llama import LLAMA, LlamaFamilyModel


def test_the_supported_list_is_the_registry():
    assert SUPPORTED_ARCHITECTURES == LOADING_LIST == tuple(registry.ARCHITECTURES)
    assert set(SUPPORTED_ARCHITECTURES) == {"llama", "qwen2", "qwen3", "mistral", "gemma3"}
    for name, entry in registry.ARCHITECTURES.items():
        assert entry.name == name and registry.get(name) is entry
        assert all(registry.for_hf_model_type(t, "x") is entry for t in entry.hf_model_types)
        if entry.gguf_architecture:
            assert registry.for_gguf(entry.gguf_architecture, "x") is entry


@pytest.fixture
def extra_architecture(monkeypatch):
    """A new architecture registered the way docs/extending.md says, with nothing else edited."""
    entry = dataclasses.replace(LLAMA, name="tinyllama-x", description="a test-only Llama variant",
                                hf_model_types=("tinyllama_x",), gguf_architecture="tinyllama-x")
    monkeypatch.setitem(registry.ARCHITECTURES, entry.name, entry)
    monkeypatch.setitem(registry._BY_HF_TYPE, "tinyllama_x", entry)
    monkeypatch.setitem(registry._BY_GGUF, "tinyllama-x", entry)
    return entry


def test_messages_list_what_the_registry_holds(tmp_path, extra_architecture):
    make_tiny_model("llama", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_hf_dir(tmp_path)
    message = str(error.value)
    assert "'gpt2'" in message and "tinyllama_x" in message and "a test-only Llama variant" in message
    assert "gemma3_text" in message and "mistral" in message
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*tinyllama-x"):
        registry.for_gguf("mamba", "file.gguf")
    with pytest.raises(UnsupportedArchitectureError, match="'nope' is not supported.*tinyllama-x"):
        registry.get("nope")


def test_a_registered_architecture_loads_and_builds_with_no_other_edit(tmp_path, extra_architecture):
    reference = make_tiny_model("llama", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "tinyllama_x"}))
    loaded = load_hf_dir(tmp_path, dtype=torch.float32)
    assert loaded.config.architecture == "tinyllama-x"
    model = build_model(loaded, device="cpu", dtype=torch.float32)
    assert isinstance(model, LlamaFamilyModel)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_entries_are_complete():
    for entry in registry.ARCHITECTURES.values():
        assert isinstance(entry, Architecture) and entry.description
        assert hasattr(entry.model_class, "load_weights") and hasattr(entry.model_class, "compute_logits")
        assert entry.hf_model_types, f"{entry.name}: no Hugging Face model_type"
        assert entry.cost.mlp_matrices > 0 and entry.cost.norms_per_layer > 0


def test_the_linear_layer_knows_no_activation():
    """The model names its MLP activation; DispatchLinear has no SiLU-specific entry point."""
    from thinkwise.kernels.linear_dispatch import DispatchLinear

    assert not [name for name in vars(DispatchLinear) if "silu" in name.lower()]
    layer = DispatchLinear(4, 8, bias=False)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 4)
    gate, up = (x @ layer.weight.T).chunk(2, dim=-1)
    assert torch.allclose(layer.forward_gated(x, "silu"), torch.nn.functional.silu(gate) * up)
    assert torch.allclose(layer.forward_gated(x, "gelu_tanh"),
                          torch.nn.functional.gelu(gate, approximate="tanh") * up)


def test_building_for_the_engine_hands_each_tensor_over_once(tmp_path):
    """consume=True empties `loaded.weights` as the model takes them (no second copy kept), and
    the model is the same as one built from a dict left intact."""
    make_tiny_model("llama", tmp_path)
    kept = load_hf_dir(tmp_path, dtype=torch.float32)
    model = build_model(kept, device="cpu", dtype=torch.float32)
    assert kept.weights  # left as it was
    consumed = load_hf_dir(tmp_path, dtype=torch.float32)
    handed = build_model(consumed, device="cpu", dtype=torch.float32, consume=True)
    assert consumed.weights == {}
    for (name, a), (_, b) in zip(model.state_dict().items(), handed.state_dict().items()):
        assert torch.equal(a, b), name
