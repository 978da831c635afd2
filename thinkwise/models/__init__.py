"""Model implementations, chosen by `ModelConfig.architecture` through the registry."""

from __future__ import annotations

import torch

from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.loading.config import LoadedModel
from thinkwise.models import registry
from thinkwise.models.registry import SUPPORTED_ARCHITECTURES
from thinkwise.models.rotary import RotaryEmbedding

__all__ = ["build_model", "SUPPORTED_ARCHITECTURES"]


class HandedOverWeights(dict):
    """Checkpoint tensors handed to `load_weights` one at a time: reading a name removes it,
    so each tensor is freed once the model holds its copy, and loading never keeps the
    checkpoint and the model whole side by side (twice the weights at the peak)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.pop(name)


def build_model(loaded: LoadedModel, *, device: torch.device | str, dtype: torch.dtype,
                compute_dtype: torch.dtype | None = None, consume: bool = False) -> torch.nn.Module:
    """Instantiate the architecture's module on `device` in `dtype` and load the weights.

    With a `compute_dtype` other than `dtype` (LayerCast), the matmul weights and the embedding
    table stay in `dtype` and everything small (norms, biases) is stored in `compute_dtype`;
    activations follow the norms' dtype and each linear layer upcasts its weight per call.
    `consume`: `loaded.weights` is emptied as the model takes each tensor (the engine's load)."""
    config = loaded.config
    family = registry.get(config.architecture).model_class
    with torch.device("meta"):
        model = family(config)
    # Built on "meta" so no memory is spent on random init of weights that load_weights
    # overwrites anyway; only the rotary frequencies (one table per rope setting the model
    # uses) are real buffers to recompute.
    model = model.to_empty(device=device).to(compute_dtype or dtype)
    if compute_dtype is not None and compute_dtype != dtype:
        for module in model.modules():
            if isinstance(module, (DispatchLinear, torch.nn.Embedding)):
                module.weight.data = module.weight.data.to(dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers(device)
    if consume:
        weights = HandedOverWeights(loaded.weights)
        loaded.weights.clear()  # `weights` now holds the only references
        model.load_weights(weights)
    else:
        model.load_weights(loaded.weights)
    return model.eval()
