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
