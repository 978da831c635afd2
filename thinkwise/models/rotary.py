"""Rotary position embeddings (the half-rotation layout Hugging Face Llama/Qwen use).

Frequencies follow the config's `rope_scaling`: none/"default", "linear", and "llama3"
(Llama 3.1+'s wavelength-dependent rescaling). On CPU cos/sin are computed per forward
from the positions actually present, so no table sized to the full context is held. On
a GPU that computation is seven small kernels per step, a visible share of a small
model's decode step, so there one table of every position's cos and sin (computed by the
same ops, so the same values) is built on first use and a step gathers its rows.
"""

from __future__ import annotations

import math

import torch

from thinkwise.errors import UnsupportedArchitectureError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedArchitectureError(
        f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
        "Use a model without this rope scaling or remove it from config.json if you know it is unused."
    )


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None, max_positions: int | None = None):
        super().__init__()
        self.head_dim, self.theta, self.rope_scaling = head_dim, theta, rope_scaling
        self.max_positions = max_positions  # the table's length (GPU); None: always compute
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, rope_scaling), persistent=False)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute frequencies on `device` (needed after building on the meta device)."""
        self.inv_freq = inverse_frequencies(self.head_dim, self.theta, self.rope_scaling).to(device)
        self._tables.clear()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [num_tokens, head_dim], computed in fp32 then cast (as HF does).
        On CUDA, rows of the table (views with a row stride of 2 x head_dim)."""
        if positions.is_cuda and self.max_positions:
            table = self._tables.get((positions.device, dtype))
            if table is None and not torch.cuda.is_current_stream_capturing():  # never build inside a graph
                table = self._table(positions.device, dtype)
            if table is not None:
                rows = table.index_select(0, positions)
                return rows[:, 0], rows[:, 1]
        return self._compute(positions, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[max_positions, 2 (cos, sin), head_dim] in `dtype`, made once per device and dtype."""
        key = (device, dtype)
        if key not in self._tables:
            cos, sin = self._compute(torch.arange(self.max_positions, device=device), dtype)
            self._tables[key] = torch.stack((cos, sin), dim=1)
        return self._tables[key]
