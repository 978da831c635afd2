"""Tiny random-weight models of every supported architecture, made with `transformers`.

`ARCHITECTURES` (the Llama family the shared `tiny` fixture runs) plus the windowed
ones, `WINDOWED_ARCHITECTURES`: Mistral and Gemma 3 with a sliding window of
`TINY_WINDOW` tokens, shorter than the tests' sequences so the window changes the result.

Each is saved as a Hugging Face directory (config.json, safetensors, a byte-level
tokenizer with a ChatML template) so tests exercise the real loading path, and the
`transformers` model itself is returned as the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHITECTURES = ("llama", "qwen2", "qwen3")
WINDOWED_ARCHITECTURES = ("mistral", "gemma3")
TINY_WINDOW = 6
VOCAB_SIZE = 260  # 256 byte symbols + 4 specials
EOS_ID = 257


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for special in ("<bos>", "<eos>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str, **overrides):
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    if arch == "qwen3":
        common["head_dim"] = 32  # Qwen3's head_dim is independent of hidden/heads
    if arch == "mistral":
        common.update(sliding_window=TINY_WINDOW, head_dim=24)
    if arch == "gemma3":
        # Every Gemma quirk set off its default, so a wrong one shows: a global layer between
        # two local ones, local and global rotary bases apart, a query scale that is not
        # head_dim^-0.5, untied embeddings, a padding id other than 0.
        common.update(
            num_hidden_layers=3, head_dim=32, sliding_window=TINY_WINDOW, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        )
    common.update(overrides)
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
               "gemma3": Gemma3TextConfig}
    return classes[arch](**common)


def make_tiny_model(arch: str, directory: Path, seed: int = 0, **overrides):
    """Save a random tiny model + tokenizer to `directory`; return the transformers model (fp32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so a wrong mapping shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return model


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
        )[0, len(prompt):].tolist()
    if EOS_ID in out:
        out = out[: out.index(EOS_ID) + 1]
    return out


# A Qwen3-style chat template that opens the thinking block itself (and closes it empty when
# enable_thinking is false), for the reasoning tests; written here, nothing downloaded.
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                     "not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")


def make_thinking_model(directory, seed: int):
    """A tiny random Qwen3 in `directory` with the byte tokenizer and THINKING_TEMPLATE."""
    reference = make_tiny_model("qwen3", directory, seed=seed)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(directory)
    return reference
