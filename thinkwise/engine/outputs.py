"""What the engine hands back: per-request outputs with every sample and its cost.

Each sample's text is also split by the engine's reasoning parser (thinkwise/reasoning/):
`reasoning_text` is its thinking span (None when it has none), `answer_text` the rest,
and `reasoning_tokens` the output tokens the thinking took, closing marker included.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from thinkwise.engine.sequence import TokenCounts
from thinkwise.reasoning.parser import PROMPT_TAIL_TOKENS


# Marker token ids per tokenizer, encoded once: outputs are built on the engine's thread, and
# encoding there each time would also share the tokenizer with the server's prepare thread.
_MARKER_IDS: "weakref.WeakKeyDictionary[Any, dict[str, list[int]]]" = weakref.WeakKeyDictionary()


def _marker_ids(tokenizer, marker: str) -> list[int]:
    try:
        known = _MARKER_IDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: encode each time
        return list(tokenizer.encode(marker, add_special_tokens=False))
    if marker not in known:
        known[marker] = list(tokenizer.encode(marker, add_special_tokens=False))
    return known[marker]


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    logprobs: list[dict[str, Any]] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp)]}
    reasoning_text: str | None = None  # the thinking span; None: the sample has none
    answer_text: str | None = None  # the text after the thinking span (None at construction: the whole text)
    reasoning_tokens: int = 0  # output tokens of the thinking span, its closing marker included

    def __post_init__(self) -> None:
        if self.answer_text is None:
            self.answer_text = self.text

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

    def split_reasoning(self, parser, tokenizer, skip_special_tokens: bool = True) -> "RequestOutput":
        """Fill every sample's reasoning/answer split and `counts.reasoning_tokens` from `parser`
        (a `thinkwise.reasoning.ReasoningParser`); returns self."""
        if parser is None or parser.name == "none":
            for output in self.outputs:
                output.reasoning_text, output.answer_text, output.reasoning_tokens = None, output.text, 0
            self.counts.reasoning_tokens = 0
            return self
        decode = close_ids = None
        prompt_tail = ""
        if tokenizer is not None:
            def decode(ids):
                return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

            close_ids = _marker_ids(tokenizer, parser.close_marker)
            try:
                prompt_tail = tokenizer.decode(self.prompt_token_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            except Exception:  # ids past the tokenizer's vocabulary (a padded embedding)
                prompt_tail = ""
        total = 0
        for output in self.outputs:
            reasoning, answer, _ = parser.split(output.text, prompt_tail)
            output.reasoning_text, output.answer_text = reasoning, answer
            output.reasoning_tokens = parser.reasoning_token_count(output.token_ids, output.text, prompt_tail,
                                                                   decode, close_ids)
            total += output.reasoning_tokens
        self.counts.reasoning_tokens = total
        return self

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
