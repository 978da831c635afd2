"""Output processing: what a sampled token does to its sequence and what callers see.

Each token is appended, detokenized incrementally, and checked against the stop rules in
order (EOS, stop token ids, stop strings — none before `min_tokens` — then the length
limits); a thinking request also has its end-of-thinking marker noted, or forced in at
the thinking budget. The result is a `TokenEvent` per sequence per step and, when every
sample of a request is done, its `RequestOutput`. The same rules decide how the next
token may be drawn (`sampling_row`: what is banned before the minimums), so the sampler
and the stop checks cannot disagree. New per-token output logic (e.g. splitting thinking
from the answer) belongs here, as another step of `append_token`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from thinkwise.engine.detokenizer import find_stop_string
from thinkwise.engine.outputs import CompletionOutput, RequestOutput
from thinkwise.engine.penalties import PenaltyRow
from thinkwise.engine.sampler import SamplingRow
from thinkwise.engine.sequence import Request, Sequence, TokenCounts


@dataclass
class TokenEvent:
    """What one step did to one sequence: the tokens/text it gained, and whether it ended."""

    request_id: str
    sample_index: int
    seq_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # With finish_reason: the sample's whole final text (a stop string may have cut text an
    # earlier event reported), so streams can settle one sample without waiting for the rest.
    final_text: str | None = None
    confidence: float | None = None  # DeepConf token confidence of the sampled token (params.confidence_top_k)


@dataclass
class StepOutput:
    finished: list[RequestOutput] = field(default_factory=list)  # requests completed this step
    events: list[TokenEvent] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    num_scheduled_seqs: int = 0

    def prepend(self, earlier: "StepOutput") -> None:
        """Put what an earlier (drained) step produced before this step's events."""
        self.events[:0] = earlier.events
        self.finished[:0] = earlier.finished


class OutputProcessor:
    """Applies sampled tokens to sequences. `finish(seq, reason, stop_reason)` and
    `force_tokens(seq, ids)` are the engine's, so a stop or a forced marker takes effect
    exactly as a caller's abort or force would; `requests` is the engine's live table."""

    def __init__(self, *, eos_token_ids: set[int], max_model_len: int, requests: dict[str, Request],
                 finish: Callable[[Sequence, str, int | str | None], None],
                 force_tokens: Callable[[Sequence, list[int]], None], reasoning_parser: Any = None,
                 tokenizer: Any = None):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests = requests
        self.finish = finish
        self.force_tokens = force_tokens
        self.reasoning_parser = reasoning_parser  # splits each output's thinking from its answer
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ before the draw
    def sampling_row(self, seq: Sequence, ahead: int = 0) -> SamplingRow:
        """How to draw the sequence's next token; `ahead` tokens sampled but not yet on the host."""
        p = seq.params
        position = seq.num_output_tokens + ahead
        banned: tuple[int, ...] = ()
        if position < p.min_tokens:
            banned = tuple(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        thinking = seq.request.thinking
        if thinking and seq.thinking_tokens is None and position < p.min_thinking_tokens:
            # The marker, and anything that would end the sample, cannot come before the minimum.
            banned = tuple(set(banned) | {thinking[0][0]} | (set() if p.ignore_eos else self.eos_token_ids))
        penalty = None
        if p.has_penalties:
            penalty = PenaltyRow(seq, seq.seq_id, p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                                 seq.token_ids, seq.num_prompt_tokens, position)
        return SamplingRow(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=seq.seed,
            position=position, logprobs=p.logprobs, banned_token_ids=banned, penalty=penalty,
            confidence_k=p.confidence_top_k,
        )

    # ------------------------------------------------------------------ after the draw
    def append_token(self, seq: Sequence, token: int, logprob: dict | None,
                     confidence: float | None = None) -> TokenEvent:
        """Append one sampled token and apply the stop rules and the thinking budget."""
        seq.token_ids.append(token)
        seq.request.counts.generated_tokens += 1
        if logprob is not None:
            seq.output_logprobs.append(logprob)
            seq.cumulative_logprob += logprob["logprob"]
        delta = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
        event = TokenEvent(seq.request.request_id, seq.sample_index, seq.seq_id, [token], "",
                           logprobs=[logprob] if logprob else [], confidence=confidence)
        text_before = len(seq.text)
        seq.text += delta
        reason, stop_reason = self.stop_reason(seq, token, delta)
        if reason is None and seq.request.thinking and seq.thinking_tokens is None:
            event.token_ids += self.apply_thinking_budget(seq)
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                if seq.detokenizer is not None:
                    seq.text += seq.detokenizer.flush()
            self.finish(seq, reason, stop_reason)
            event.finish_reason = reason
            event.final_text = seq.text
        # The text event is what the visible text gained (a stop string may have cut it).
        event.text = seq.text[text_before:] if len(seq.text) >= text_before else ""
        return event

    def stop_reason(self, seq: Sequence, token: int, delta: str) -> tuple[str | None, int | str | None]:
        """(finish reason, stop reason) if `token` (whose text is `delta`) ends the sequence;
        a stop string found in the text is cut off it here (kept with include_stop_str_in_output)."""
        params = seq.params
        past_min = seq.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if past_min and token in params.stop_token_ids:
            return "stop", token
        if past_min and params.stop and delta:
            found = find_stop_string(seq.text, len(delta), params.stop)
            if found is not None:
                index, stop = found
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                return "stop", stop
        if seq.max_tokens is not None and seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def apply_thinking_budget(self, seq: Sequence) -> list[int]:
        """Note where thinking ended, or force its end at the budget; returns forced ids."""
        end, forced = seq.request.thinking
        output = seq.token_ids[seq.num_prompt_tokens :]
        if len(output) >= len(end) and output[-len(end) :] == end:
            seq.thinking_tokens = len(output) - len(end)
        elif seq.params.thinking_budget is not None and len(output) >= seq.params.thinking_budget:
            seq.thinking_tokens = len(output)
            self.force_tokens(seq, forced)
            return list(forced)
        return []

    # ------------------------------------------------------------------ requests
    def settle(self, sequences: list[Sequence], result: StepOutput) -> None:
        """After `sequences` gained a token: note first-token times, finalize finished requests."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq in sequences:
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
            touched[request.request_id] = request
        for request in touched.values():
            if request.is_finished:
                result.finished.append(self.finalize(request))

    def finalize(self, request: Request) -> RequestOutput:
        """The request's final output; it leaves the engine's table."""
        output = self.request_output(request)
        if request.finish_time is None:
            request.finish_time = time.monotonic()
        output.metrics["finish_time"] = request.finish_time
        self.requests.pop(request.request_id, None)
        return output

    def request_output(self, request: Request) -> RequestOutput:
        """A snapshot of a request: every sample's text, tokens, finish state and counts."""
        outputs = [
            CompletionOutput(
                index=seq.sample_index,
                text=seq.text,
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob if request.params.logprobs is not None else None,
                logprobs=list(seq.output_logprobs) if request.params.logprobs is not None else None,
            )
            for seq in sorted(request.sequences, key=lambda s: s.sample_index)
        ]
        metrics = {"arrival_time": request.arrival_time}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.is_finished,
            counts=TokenCounts(**vars(request.counts)),
            metrics=metrics,
        ).split_reasoning(self.reasoning_parser, self.tokenizer, request.params.skip_special_tokens)
