"""Gemma 3 (text) against transformers' Gemma3ForCausalLM on tiny random configs (fp32).

The tiny config (tests/tiny_models.py) sets every Gemma quirk away from the Llama default:
local/global layers with different rotary bases and a window shorter than the sequences,
query_pre_attn_scalar != head_dim, (1 + w) norms with perturbed weights, GeGLU, the
embedding scale. A second config adds final-logit soft-capping and tied embeddings (and
an attention soft-cap, which transformers' Gemma 3 does not apply, and neither does thinkwise).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.models import model_checks as checks
from tests.tiny_models import TINY_WINDOW, make_tiny_model
from thinkwise.errors import UnsupportedArchitectureError
from thinkwise.loading.hf_dir import load_hf_dir


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-gemma3")
    return directory, make_tiny_model("gemma3", directory, seed=8)


@pytest.fixture(scope="module")
def capped_gemma3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-gemma3-capped")
    return directory, make_tiny_model("gemma3", directory, seed=9, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, tie_word_embeddings=True)


def test_config_translation(tiny_gemma3):
    directory, reference = tiny_gemma3
    config = load_hf_dir(directory).config
    assert config.architecture == "gemma3" and config.head_dim == 32
    assert [config.layer_window(i) for i in range(3)] == [TINY_WINDOW, None, TINY_WINDOW]
    assert config.rope_theta == 1_000_000.0 and config.options["local_rope_theta"] == 100.0
    assert config.options["query_pre_attn_scalar"] == 20 and config.options["activation"] == "gelu_tanh"
    assert not config.tie_word_embeddings


def test_prefill_logits_match_transformers(tiny_gemma3):
    checks.check_prefill_logits(*tiny_gemma3)


def test_decode_logits_match_transformers(tiny_gemma3):
    checks.check_decode_logits(*tiny_gemma3)


def test_greedy_batch_matches_transformers(tiny_gemma3):
    checks.check_greedy(*tiny_gemma3)


def test_greedy_under_forced_preemption(tiny_gemma3):
    checks.check_greedy_under_preemption(*tiny_gemma3)


def test_chunked_prefill_matches(tiny_gemma3):
    checks.check_chunked_prefill(*tiny_gemma3)


def test_prefix_sharing_matches(tiny_gemma3):
    checks.check_prefix_sharing(*tiny_gemma3)


def test_soft_capping_and_tied_embeddings(capped_gemma3, caplog):
    directory, reference = capped_gemma3
    config = load_hf_dir(directory).config
    assert config.tie_word_embeddings
    assert config.options["final_logit_softcapping"] == 3.0 and "attn_logit_softcapping" not in config.options
    assert "does not apply it" in caplog.text
    checks.check_prefill_logits(directory, reference)
    checks.check_decode_logits(directory, reference, steps=12)


def test_older_config_style_is_read(tmp_path):
    """Configs written before transformers 5: rope_theta + rope_local_base_freq and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    reference = make_tiny_model("gemma3", tmp_path, seed=10)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.pop("layer_types")
    raw.update(rope_theta=1_000_000.0, rope_local_base_freq=100.0, sliding_window_pattern=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_hf_dir(tmp_path).config
    assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert config.options["local_rope_theta"] == 100.0
    checks.check_greedy(tmp_path, reference, max_tokens=12)


def test_window_longer_than_the_context_is_full_attention(tmp_path):
    reference = make_tiny_model("gemma3", tmp_path, seed=11, sliding_window=4096)
    checks.check_greedy(tmp_path, reference, max_tokens=12)


@pytest.mark.parametrize("change,message", [
    ({"hidden_activation": "relu"}, "'relu' activation"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"final_logit_softcapping": -1}, "final_logit_softcapping"),
])
def test_what_it_cannot_run_is_refused_naming_it(tmp_path, change, message):
    make_tiny_model("gemma3", tmp_path, seed=12)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_hf_dir(tmp_path)


def test_multimodal_gemma3_wrapper_is_refused(tmp_path):
    make_tiny_model("gemma3", tmp_path, seed=12)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": raw}))
    with pytest.raises(UnsupportedArchitectureError, match="'gemma3'.*gemma3_text"):
        load_hf_dir(tmp_path)


def test_embedding_scale_is_rounded_to_the_compute_dtype():
    from thinkwise.models.gemma3 import Gemma3Model

    scale = Gemma3Model._embed_scale.__get__(type("M", (), {"_embed_scales": {}, "config": type("C", (), {
        "hidden_size": 640})})())
    assert scale(torch.float32) == pytest.approx(640 ** 0.5, rel=1e-7)
    assert scale(torch.bfloat16) == torch.tensor(640 ** 0.5).to(torch.bfloat16).item() != scale(torch.float32)


def gguf_fields(**metadata):
    from thinkwise.models.gemma3 import _gemma3_gguf

    fields = dict(num_layers=3, hidden_size=64, num_heads=4, head_dim=32)
    return _gemma3_gguf(lambda key, default=None: metadata.get(key, default), fields)


def test_gguf_settings_llama_cpp_does_not_write():
    fields = gguf_fields(**{"attention.sliding_window": 512})
    assert fields["layer_types"] == ("sliding_attention",) * 3  # every 6th layer is global
    assert fields["options"]["query_pre_attn_scalar"] == 32 and fields["options"]["local_rope_theta"] == 10000.0
    flags = gguf_fields(**{"attention.sliding_window": 512, "attention.sliding_window_pattern": [True, False, True]})
    assert flags["layer_types"] == ("sliding_attention", "full_attention", "sliding_attention")
    every_second = gguf_fields(**{"attention.sliding_window": 512, "attention.sliding_window_pattern": 2})
    assert every_second["layer_types"] == flags["layer_types"]


@pytest.mark.parametrize("metadata,message", [
    ({"attention.sliding_window": 0}, "sliding_window is 0"),
    ({"attention.sliding_window_pattern": [True, False]}, "not one flag per layer"),
    ({"attention.sliding_window_pattern": 0}, "not one flag per layer"),
    ({"attention.sliding_window_pattern": "6"}, "not one flag per layer"),
])
def test_bad_gguf_window_metadata_is_refused(metadata, message):
    from thinkwise.models.architecture import Unsupported

    with pytest.raises(Unsupported, match=message):
        gguf_fields(**metadata)
