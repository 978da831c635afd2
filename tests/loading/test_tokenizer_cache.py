"""thinkwise/loading/tokenizer_cache.py: the first-use tokenizer build keeps stdout clean."""

from __future__ import annotations

import torch


def test_first_use_progress_goes_to_stderr_not_stdout(smollm2_gguf, tmp_path, capfd):
    """A first use prints a progress line; stdout must stay pure results (`--json` consumers)."""
    from thinkwise.loading import load_model

    load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(tmp_path / "cache"), progress=True)
    captured = capfd.readouterr()
    assert "building the tokenizer" in captured.err
    assert captured.out == ""


def test_gemma_end_of_turn_stops_a_chat_gguf():
    """Gemma's chat template ends each turn with <end_of_turn> (id 106), not its eos (1)."""
    from types import SimpleNamespace

    from thinkwise.loading.tokenizer_cache import gguf_eos_ids

    vocab = {"<eos>": 1, "<end_of_turn>": 106}
    tokenizer = SimpleNamespace(eos_token_id=1, convert_tokens_to_ids=lambda t: vocab.get(t, 3), unk_token_id=3,
                                get_vocab=lambda: vocab)
    template = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    assert gguf_eos_ids((1,), tokenizer, template) == (1, 106)
    assert gguf_eos_ids((1,), tokenizer, None) == (1,)
