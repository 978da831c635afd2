"""What the engine hands back: per-request outputs with every sample and its cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from thinkwise.engine.sequence import TokenCounts


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    logprobs: list[dict[str, Any]] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp)]}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    counts: TokenCounts = field(default_factory=TokenCounts)
    metrics: dict[str, float] = field(default_factory=dict)  # arrival/first-token/finish times (monotonic s)

    @property
    def num_prompt_tokens_computed(self) -> int:
        return self.counts.prompt_tokens_computed

    @property
    def num_cached_tokens(self) -> int:
        return self.counts.prompt_tokens_cached

    @property
    def num_generated_tokens(self) -> int:
        return self.counts.generated_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "outputs": [asdict(o) for o in self.outputs],
            "finished": self.finished,
            "token_counts": asdict(self.counts),
            "metrics": self.metrics,
        }
