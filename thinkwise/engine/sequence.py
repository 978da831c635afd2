"""Requests and the sequences (samples) they own.

A `Sequence` is one token stream: the prompt plus what was sampled or forced after
it. `num_computed_tokens` says how many of its tokens already have KV in the cache;
everything past that is pending and gets computed in the next step(s) — which makes a
prompt's prefill, a chunk of it, a decode step, tokens forced by a strategy and
recomputation after preemption all the same operation. A `Request` groups the `n`
samples of one prompt and carries the token accounting reported back to callers.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from thinkwise.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenCounts:
    """Per-request token accounting; prompt work is counted once however many samples share it."""

    prompt_tokens: int = 0  # length of the prompt
    prompt_tokens_computed: int = 0  # prompt positions whose KV this request computed (recompute included)
    prompt_tokens_cached: int = 0  # prompt positions served from the prefix cache
    generated_tokens: int = 0  # tokens sampled, over all samples
    recomputed_tokens: int = 0  # generated tokens whose KV was computed again after preemption
    forced_tokens: int = 0  # tokens appended by a caller rather than sampled
    aborted_tokens: int = 0  # output tokens (sampled or forced) of samples aborted before they finished
    # Analytic work charged by `cost.attribute_step` from the steps that served this request.
    flops: float = 0.0
    bytes_weights: float = 0.0  # its share of the weights read each step, plus its embedding rows
    bytes_kv: float = 0.0  # KV cache read and written for it (a cascade-shared prefix split over its readers)
    device_time_s: float = 0.0  # GPU time of its steps, split by token share (CUDA only)
    energy_j: float | None = None  # NVML energy of its steps, split by token share; None: unavailable


class Sequence:
    def __init__(self, request: "Request", token_ids: list[int], num_prompt_tokens: int, sample_index: int, seed: int):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.sample_index = sample_index
        self.seed = seed
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of its full, computed blocks
        self.max_tokens: int | None = None  # output budget; starts at params.max_tokens, strategies may extend it
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.max_computed_tokens = 0  # high-water mark, to tell first computation from recomputation
        self.output_logprobs: list[dict[str, Any]] = []
        self.cumulative_logprob = 0.0
        self.text = ""  # detokenized output, maintained by the engine
        self.thinking_tokens: int | None = None  # output tokens spent thinking, once thinking ended
        self.detokenizer: Any = None
        # (step, row) of a launched decode step whose sampled token is not read back yet
        # (async scheduling); its KV for the last token is then already being computed.
        self.inflight: Any = None
        self.redraw_on_host = False  # the device draw could not be exact: the next one is on the host

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def mark_computed(self, n: int) -> None:
        """The next `n` pending tokens now have KV; counts prompt work and recomputation."""
        start, end = self.num_computed_tokens, self.num_computed_tokens + n
        counts = self.request.counts
        counts.prompt_tokens_computed += max(0, min(end, self.num_prompt_tokens) - start)
        counts.recomputed_tokens += max(0, min(end, self.max_computed_tokens) - max(start, self.num_prompt_tokens))
        self.num_computed_tokens = end
        self.max_computed_tokens = max(self.max_computed_tokens, end)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value}, blocks={self.block_table})"
        )


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    counts: TokenCounts = field(default_factory=TokenCounts)
    pending_forks: int = 0  # samples still to fork off when the prompt's prefill completes
    thinking: tuple[list[int], list[int]] | None = None  # (end marker ids, ids forced at the budget)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.pending_forks == 0 and all(s.is_finished for s in self.sequences)
