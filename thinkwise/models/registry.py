"""The model registry: one `Architecture` entry per architecture thinkwise can run.

An entry says everything the rest of thinkwise needs to know about an architecture:
its model class; how a Hugging Face config.json and a GGUF file describe it (which
`model_type` / `general.architecture` names it answers to, and a function that turns
their architecture-specific settings into `ModelConfig` fields, refusing what the model
class cannot run); how llama.cpp names its tensors and what the converter did to them;
and the shape of its cost (the gated MLP's matrices). Loaders, the model builder, the
cost model and every "supported: ..." message read it, so adding an architecture is one
model file with its entry plus one line in `_ENTRIES` below (docs/extending.md).
"""

from __future__ import annotations

from typing import Any

from thinkwise.errors import UnsupportedArchitectureError
from thinkwise.models.architecture import Architecture, Unsupported  # noqa: F401  (re-exported for loaders)
from thinkwise.models.gemma3 import GEMMA3
from thinkwise.models.llama import LLAMA, MISTRAL, QWEN2, QWEN3

# Each model file defines its entries; this tuple is the order of the supported list.
_ENTRIES = (LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA3)
ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)
_BY_HF_TYPE = {t: entry for entry in ARCHITECTURES.values() for t in entry.hf_model_types}
_BY_GGUF = {e.gguf_architecture: e for e in ARCHITECTURES.values() if e.gguf_architecture}


def supported_list() -> str:
    """'llama (Llama 2/3, ...), qwen2 (...), ...' for messages."""
    return ", ".join(f"{e.name} ({e.description})" for e in ARCHITECTURES.values())


def get(name: str) -> Architecture:
    """The entry of ModelConfig.architecture `name`."""
    entry = ARCHITECTURES.get(name)
    if entry is None:
        raise UnsupportedArchitectureError(f"architecture {name!r} is not supported; supported: {supported_list()}")
    return entry


def for_hf_model_type(model_type: Any, where: str) -> Architecture:
    entry = _BY_HF_TYPE.get(model_type) if isinstance(model_type, str) else None
    if entry is None:
        raise UnsupportedArchitectureError(
            f"{where} holds a {model_type!r} model (config.json model_type); thinkwise supports the model types "
            f"{', '.join(_BY_HF_TYPE)} ({supported_list()}). Use a model of one of those architectures."
        )
    return entry


def for_gguf(architecture: Any, where: str) -> Architecture:
    entry = _BY_GGUF.get(architecture) if isinstance(architecture, str) else None
    if entry is None:
        raise UnsupportedArchitectureError(
            f"{where} is a {architecture!r} model; thinkwise supports the GGUF architectures {', '.join(_BY_GGUF)}. "
            "Use a model of one of those architectures."
        )
    return entry
