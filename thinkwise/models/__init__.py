"""Model implementations, chosen by `ModelConfig.architecture`."""

from __future__ import annotations

import torch

from thinkwise.errors import UnsupportedArchitectureError
from thinkwise.loading.config import SUPPORTED_ARCHITECTURES, LoadedModel
from thinkwise.models.llama import LlamaFamilyModel

_FAMILIES = {"llama": LlamaFamilyModel, "qwen2": LlamaFamilyModel, "qwen3": LlamaFamilyModel}


def build_model(loaded: LoadedModel, *, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate the architecture's module on `device` in `dtype` and load the weights."""
    config = loaded.config
    family = _FAMILIES.get(config.architecture)
    if family is None:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    with torch.device("meta"):
        model = family(config)
    # Built on "meta" so no memory is spent on random init of weights that load_weights
    # overwrites anyway; only the rotary frequencies are real buffers to recompute.
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset_buffers(device)
    model.load_weights(loaded.weights)
    return model.eval()
