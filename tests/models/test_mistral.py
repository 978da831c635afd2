"""Mistral (the Llama-family model with a sliding window in every layer) against transformers.

The tiny model's window (tests/tiny_models.py: TINY_WINDOW) is shorter than every checked
sequence, so these fail if any attention path ignores it.
"""

from __future__ import annotations

import pytest

from tests.models import model_checks as checks
from tests.tiny_models import make_tiny_model
from thinkwise.loading.hf_dir import load_hf_dir


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-mistral")
    return directory, make_tiny_model("mistral", directory, seed=4)


def test_config_carries_the_window(tiny_mistral):
    directory, reference = tiny_mistral
    config = load_hf_dir(directory).config
    assert config.architecture == "mistral" and config.sliding_window == reference.config.sliding_window
    assert config.head_dim == 24  # explicit, not hidden / heads
    assert [config.layer_window(i) for i in range(config.num_layers)] == [config.sliding_window] * config.num_layers


def test_prefill_logits_match_transformers(tiny_mistral):
    checks.check_prefill_logits(*tiny_mistral)


def test_decode_logits_match_transformers(tiny_mistral):
    checks.check_decode_logits(*tiny_mistral)


def test_greedy_batch_matches_transformers(tiny_mistral):
    checks.check_greedy(*tiny_mistral)


def test_greedy_under_forced_preemption(tiny_mistral):
    checks.check_greedy_under_preemption(*tiny_mistral)


def test_chunked_prefill_matches(tiny_mistral):
    checks.check_chunked_prefill(*tiny_mistral)


def test_prefix_sharing_matches(tiny_mistral):
    checks.check_prefix_sharing(*tiny_mistral)


def test_window_longer_than_the_context_is_full_attention(tmp_path):
    """A window wider than any sequence changes nothing: equal to transformers' Mistral
    without a window, and to the Llama model of the same weights."""
    reference = make_tiny_model("mistral", tmp_path, seed=5, sliding_window=4096)
    checks.check_greedy(tmp_path, reference, max_tokens=12)


def test_no_window_is_full_attention(tmp_path):
    reference = make_tiny_model("mistral", tmp_path, seed=6, sliding_window=None)
    assert load_hf_dir(tmp_path).config.sliding_window is None
    checks.check_greedy(tmp_path, reference, max_tokens=12)


@pytest.mark.parametrize("window", [0, -3, "4096", 2.5, True])
def test_a_bad_window_is_refused_naming_it(tmp_path, window):
    import json

    from thinkwise.errors import UnsupportedArchitectureError

    make_tiny_model("mistral", tmp_path, seed=7)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sliding_window"] = window
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="sliding_window"):
        load_hf_dir(tmp_path)
