"""A sampler whose logits are scripted per sample, for strategies that react to what the model emits.

`ScriptedLogitsSampler` wraps an engine's real `Sampler` and replaces, row by row, the
logits it is given by a script chosen from the row's seed (a seeded request gives sample
i the seed `mix_seed(seed, i)`, so seed -> sample is known in advance) and the row's
position. The real sampler then draws and computes DeepConf's confidence from those
logits, on the same code path the engine uses (the synchronous `__call__`, or `draw` +
`confidence` under async scheduling), so the tests drive the engine, not a mock of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from thinkwise.engine.sampler import mix_seed

# script(position) -> (token id, spread): the token gets logit 0; with spread L > 0 every
# other token gets -L (a peaked row: confidence 0.95 L for k=20); with spread None the top
# 20 tokens from the token on are equal and the rest -60 (a flat top-20: confidence log 20).
Script = Callable[[int], tuple[int, float | None]]


def peaked_confidence(spread: float, k: int = 20) -> float:
    return (k - 1) * spread / k


class ScriptedLogitsSampler:
    def __init__(self, inner, vocab_size: int):
        self.inner = inner
        self.vocab = vocab_size
        self.scripts: dict[int, Script] = {}  # row seed -> script
        self.first_position: dict[int, int] = {}  # seed -> the position it was first seen at

    def script(self, seed: int, indices, script: Script) -> None:
        for index in indices:
            self.scripts[mix_seed(seed, index)] = script

    def _logits(self, logits: torch.Tensor, rows) -> torch.Tensor:
        out = logits.float().clone()
        for i, row in enumerate(rows):
            script = self.scripts.get(row.seed)
            if script is None:
                continue
            start = self.first_position.setdefault(row.seed, row.position)
            token, spread = script(row.position - start)
            if spread is None:
                out[i] = -60.0
                out[i, token:token + 20] = 0.0
            else:
                out[i] = -float(spread)
                out[i, token] = 0.0
        return out

    def __call__(self, logits, rows):
        return self.inner(self._logits(logits, rows), rows)

    def draw(self, logits, rows, exact: bool = False):
        return self.inner.draw(self._logits(logits, rows), rows, exact=exact)

    def confidence(self, logits, rows):
        return self.inner.confidence(self._logits(logits, rows), rows)

    def __getattr__(self, name):
        return getattr(self.inner, name)
