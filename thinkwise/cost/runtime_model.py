"""Idealized runtime model (Narayanan et al.): runtime = f(prompt) + g x (output - 1).

f is the time to the first token, linear in the prompt length (an intercept for the
fixed per-request cost plus a per-prompt-token slope); g is the time per further output
token. Both are fitted by least squares to runs profiled on this machine, and
`error_on` reports the mean absolute percentage error on held-out runs, which says how
far a single request's runtime can be predicted from its lengths alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ProfiledRun:
    prompt_tokens: int
    output_tokens: int
    seconds: float


@dataclass
class RuntimeModel:
    intercept_s: float
    per_prompt_token_s: float
    per_output_token_s: float  # g

    @classmethod
    def fit(cls, runs: list[ProfiledRun]) -> RuntimeModel:
        if len(runs) < 3:
            raise ValueError("fitting the runtime model needs at least 3 profiled runs")
        design = np.array([[1.0, r.prompt_tokens, max(0, r.output_tokens - 1)] for r in runs])
        target = np.array([r.seconds for r in runs])
        (a, b, g), *_ = np.linalg.lstsq(design, target, rcond=None)
        return cls(float(a), float(b), float(g))

    def predict(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.intercept_s + self.per_prompt_token_s * prompt_tokens + \
            self.per_output_token_s * max(0, output_tokens - 1)

    def error_on(self, runs: list[ProfiledRun]) -> float:
        """Mean absolute percentage error (%) of the predictions on `runs`."""
        errors = [abs(self.predict(r.prompt_tokens, r.output_tokens) - r.seconds) / r.seconds for r in runs]
        return 100.0 * sum(errors) / len(errors)
