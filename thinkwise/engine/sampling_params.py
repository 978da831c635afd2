"""What to sample and when to stop, per request (the vLLM/OpenAI vocabulary).

Validation happens here, at construction, so a bad value is reported with the name of
the parameter and the accepted range before any work is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinkwise.errors import InvalidParameterError


def _fail(param: str, message: str) -> None:
    raise InvalidParameterError(f"{param} {message}", param=param)


@dataclass
class SamplingParams:
    n: int = 1  # independent samples that share one prefill of the prompt
    max_tokens: int | None = 16  # None: until a stop condition or the context is full
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    seed: int | None = None  # makes sampling reproducible whatever else is batched
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # suppress EOS / stop tokens before this many tokens
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus top-k
    skip_special_tokens: bool = True
    # Thinking budget (s1-style budget forcing) for models that reason before `thinking_end`:
    # at `thinking_budget` output tokens without the marker, the marker and `answer_prefix`
    # are forced; before `min_thinking_tokens` the marker (a single token) cannot be sampled.
    thinking_budget: int | None = None
    min_thinking_tokens: int = 0
    thinking_end: str = "</think>"
    answer_prefix: str = ""
    # Forced before the closing marker when the thinking budget runs out (e.g. "Time is up,
    # answering now."); None: the engine's EngineConfig.thinking_budget_message.
    thinking_budget_message: str | None = None
    # Penalties with vLLM's semantics (applied on the device by the sampler): presence and
    # frequency subtract over the generated tokens, repetition divides positive (multiplies
    # negative) logits of every token in the prompt or the output; 0, 0, 1 are neutral.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # DeepConf: > 0 makes every sampled token carry its confidence, -mean of the model's top-k
    # logprobs, computed on the device with the draw (TokenEvent.confidence); 0 = off.
    confidence_top_k: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.n, int) or self.n < 1:
            _fail("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            _fail("max_tokens", f"must be an integer >= 1 (or None for 'until the context is full'), got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            _fail("temperature", f"must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            _fail("top_k", f"must be an integer >= 1, or 0/-1 to disable, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not (0 <= self.min_p <= 1):
            _fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            _fail("seed", f"must be an integer or None, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            _fail("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            _fail("logprobs", f"must be an integer in [0, 20] or None, got {self.logprobs!r}")
        if self.thinking_budget is not None and (not isinstance(self.thinking_budget, int) or self.thinking_budget < 1):
            _fail("thinking_budget", f"must be an integer >= 1 or None, got {self.thinking_budget!r}")
        if not isinstance(self.min_thinking_tokens, int) or self.min_thinking_tokens < 0:
            _fail("min_thinking_tokens", f"must be an integer >= 0, got {self.min_thinking_tokens!r}")
        if self.thinking_budget is not None and self.min_thinking_tokens > self.thinking_budget:
            _fail("min_thinking_tokens", "must not exceed thinking_budget")
        if not isinstance(self.confidence_top_k, int) or isinstance(self.confidence_top_k, bool) \
                or not 0 <= self.confidence_top_k <= 1024:
            _fail("confidence_top_k", f"must be an integer in [0, 1024] (0: off), got {self.confidence_top_k!r}")
        if not self.thinking_end:
            _fail("thinking_end", "must be a non-empty marker such as '</think>'")
        if self.thinking_budget_message is not None and not isinstance(self.thinking_budget_message, str):
            _fail("thinking_budget_message", f"must be a string or None, got {type(self.thinking_budget_message).__name__}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                _fail(name, f"must be a number in [-2, 2] (0 disables), got {value!r}")
        value = self.repetition_penalty
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            _fail("repetition_penalty", f"must be a finite number > 0 (1 disables), got {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            _fail("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", "must be non-negative integers")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
