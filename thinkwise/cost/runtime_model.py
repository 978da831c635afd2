"""Idealized runtime model (Narayanan et al.): runtime = f(prompt) + g x (output - 1).

f is the time to the first token, linear in the prompt length (an intercept for the
fixed per-request cost plus a per-prompt-token slope); g is the time per further output
token. Both are fitted by least squares to isolated runs profiled on this machine
(`profile` times any callable that runs one request), and `error_on` reports the mean
absolute percentage error on held-out runs, which says how far a single request's
runtime can be predicted from its lengths alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ProfiledRun:
    prompt_tokens: int
    output_tokens: int
    seconds: float


@dataclass
class RuntimeModel:
    intercept_s: float  # f(0): fixed cost of a request
    per_prompt_token_s: float  # slope of f
    per_output_token_s: float  # g

    @classmethod
    def fit(cls, runs: list[ProfiledRun]) -> RuntimeModel:
        """Least squares over the runs; they must vary in prompt length and in output length."""
        design = np.array([[1.0, r.prompt_tokens, max(0, r.output_tokens - 1)] for r in runs]).reshape(-1, 3)
        if np.linalg.matrix_rank(design) < 3:
            raise ValueError("fitting the runtime model needs runs with at least two prompt lengths and two "
                             "output lengths (3 unknowns)")
        target = np.array([r.seconds for r in runs])
        (a, b, g), *_ = np.linalg.lstsq(design, target, rcond=None)
        return cls(float(a), float(b), float(g))

    def prefill_s(self, prompt_tokens: int) -> float:
        """f(prompt): the time to the first output token."""
        return self.intercept_s + self.per_prompt_token_s * prompt_tokens

    def predict(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.prefill_s(prompt_tokens) + self.per_output_token_s * max(0, output_tokens - 1)

    def error_on(self, runs: list[ProfiledRun]) -> float:
        """Mean absolute percentage error (%) of the predictions on `runs`."""
        if not runs:
            raise ValueError("no runs to measure the error on")
        errors = [abs(self.predict(r.prompt_tokens, r.output_tokens) - r.seconds) / r.seconds for r in runs]
        return 100.0 * sum(errors) / len(errors)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def profile(run_one: Callable[[int, int], object], prompt_lengths: Iterable[int], output_lengths: Iterable[int],
            repeats: int = 1) -> list[ProfiledRun]:
    """Time `run_one(prompt_tokens, output_tokens)` (one isolated request, run to exactly
    that many output tokens) over the grid, `repeats` times, the grid's order interleaved
    so that slow drift of the machine spreads over all sizes."""
    grid = [(p, o) for p in prompt_lengths for o in output_lengths]
    runs = []
    for _ in range(repeats):
        for prompt, output in grid:
            start = time.perf_counter()
            run_one(prompt, output)
            runs.append(ProfiledRun(prompt, output, time.perf_counter() - start))
    return runs


def split_held_out(runs: list[ProfiledRun]) -> tuple[list[ProfiledRun], list[ProfiledRun]]:
    """(fit, held-out): a checkerboard over the (prompt, output) grid, so both halves cover
    every prompt length and every output length and the held-out half is interpolation,
    not extrapolation; repeats of one grid point alternate between the halves."""
    prompts = sorted({r.prompt_tokens for r in runs})
    outputs = sorted({r.output_tokens for r in runs})
    seen: dict[tuple[int, int], int] = {}
    fit, held_out = [], []
    for r in runs:
        key = (r.prompt_tokens, r.output_tokens)
        repeat = seen.get(key, 0)
        seen[key] = repeat + 1
        parity = (prompts.index(r.prompt_tokens) + outputs.index(r.output_tokens) + repeat) % 2
        (fit if parity == 0 else held_out).append(r)
    return fit, held_out
