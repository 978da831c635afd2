"""The embedded default model (Qwen2.5-Coder-0.5B GGUF) against transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.loading import resolve_default_model

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "If I have 3 apples and eat one, how many are left? Explain."}],
]


@pytest.fixture(scope="module")
def default_llm():
    return LLM("default", dtype="float32", device="cpu")


def test_greedy_chat_matches_transformers(default_llm):
    from transformers import AutoModelForCausalLM

    path = resolve_default_model()
    outputs = default_llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=32))
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    eos = set(default_llm.engine.eos_token_ids)
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        with torch.inference_mode():
            generated = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                           do_sample=False)[0, ids.shape[1]:].tolist()
        for i, token in enumerate(generated):  # transformers pads after its EOS; compare up to it
            if token in eos:
                generated = generated[: i + 1]
                break
        assert output.outputs[0].token_ids == generated
        assert output.outputs[0].text.strip()
    del reference


def test_default_model_chat_template_and_counts(default_llm):
    out = default_llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    text = default_llm.tokenizer.decode(out.prompt_token_ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    again = default_llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    assert again.counts.prompt_tokens_cached > 0
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
