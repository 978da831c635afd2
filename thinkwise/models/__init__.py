"""Model implementations, chosen by `ModelConfig.architecture`."""

from __future__ import annotations

import torch

from thinkwise.errors import UnsupportedArchitectureError
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.loading.config import SUPPORTED_ARCHITECTURES, LoadedModel
from thinkwise.models.llama import LlamaFamilyModel

_FAMILIES = {"llama": LlamaFamilyModel, "qwen2": LlamaFamilyModel, "qwen3": LlamaFamilyModel}


def build_model(loaded: LoadedModel, *, device: torch.device | str, dtype: torch.dtype,
                compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Instantiate the architecture's module on `device` in `dtype` and load the weights.

    With a `compute_dtype` other than `dtype` (LayerCast), the matmul weights and the embedding
    table stay in `dtype` and everything small (norms, biases) is stored in `compute_dtype`;
    activations follow the norms' dtype and each linear layer upcasts its weight per call."""
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
    model = model.to_empty(device=device).to(compute_dtype or dtype)
    if compute_dtype is not None and compute_dtype != dtype:
        for module in model.modules():
            if isinstance(module, (DispatchLinear, torch.nn.Embedding)):
                module.weight.data = module.weight.data.to(dtype)
    model.rotary.reset_buffers(device)
    model.load_weights(loaded.weights)
    return model.eval()
