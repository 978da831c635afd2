"""What every strategy shares: its result (`Answer`), its cost, and the sample groups it drives.

A strategy asks a backend for a `SampleGroup`: k samples of one prompt that share the
prompt's prefill and KV blocks. It watches the group's events (tokens, text, finishes)
and acts between engine steps: abort one sample or all, force tokens, extend budgets.
`LocalBackend` runs groups on this process's `AsyncEngine`, so strategies run
concurrently with ordinary requests and every token they report is one the engine
counted. `Answer.cost` is filled from the engine's own `TokenCounts`, summed over every
request the strategy issued.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from thinkwise.cost.hardware import device_intensity
from thinkwise.engine.async_engine import AsyncEngine, EngineDeadError, StreamItem
from thinkwise.engine.outputs import RequestOutput
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import TokenCounts


@dataclass
class SampleOutcome:
    index: int
    text: str
    answer: str | None
    num_tokens: int
    finish_reason: str | None  # "stop" (finished), "length" (ran out of budget), "abort"
    abort_reason: str | None = None
    score: float | None = None  # a verifier's score, when one was used

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


@dataclass
class StrategyCost:
    requests: int = 0  # engine requests issued (rounds)
    samples: int = 0
    prompt_tokens: int = 0  # prompt length, once per request
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    decode_tokens: int = 0  # sampled tokens over all samples, aborted ones included
    forced_tokens: int = 0
    recomputed_tokens: int = 0
    aborted_samples: int = 0
    aborted_tokens: int = 0  # output tokens of aborted samples (already in decode_tokens / forced_tokens)
    wall_time_s: float = 0.0
    flops: float = 0.0
    bytes_moved: float = 0.0  # bytes_weights + bytes_kv
    bytes_weights: float = 0.0  # this strategy's share of the weights read in each step it took part in
    bytes_kv: float = 0.0  # KV read and written
    device_time_s: float = 0.0
    energy_j: float | None = None  # None: no energy counter on this machine
    effective_flops: float = 0.0  # Kinetics: flops + I x bytes_moved (I of this device)
    # decode_tokens + forced_tokens split by the reasoning parser: inside thinking spans (closing
    # markers included; a sample that never closed its block is all thinking) and after them.
    thinking_tokens: int = 0
    answer_tokens: int = 0

    def add(self, counts: TokenCounts, intensity: float = 0.0) -> None:
        """Sum one engine request's counts; `intensity` (FLOP/byte) prices its bytes."""
        self.requests += 1
        self.prompt_tokens += counts.prompt_tokens
        self.prompt_tokens_computed += counts.prompt_tokens_computed
        self.prompt_tokens_cached += counts.prompt_tokens_cached
        self.decode_tokens += counts.generated_tokens
        self.forced_tokens += counts.forced_tokens
        self.recomputed_tokens += counts.recomputed_tokens
        self.aborted_tokens += counts.aborted_tokens
        thinking = getattr(counts, "reasoning_tokens", 0)
        self.thinking_tokens += thinking
        self.answer_tokens += counts.generated_tokens + counts.forced_tokens - thinking
        moved = counts.bytes_weights + counts.bytes_kv
        self.flops += counts.flops
        self.bytes_moved += moved
        self.bytes_weights += counts.bytes_weights
        self.bytes_kv += counts.bytes_kv
        self.effective_flops += counts.flops + intensity * moved
        self.device_time_s += counts.device_time_s
        if counts.energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + counts.energy_j


@dataclass
class Answer:
    strategy: str
    answer: str | None  # the extracted final answer
    text: str  # the chosen sample's text
    votes: dict[str, float] = field(default_factory=dict)  # answer -> votes (or summed score)
    samples: list[SampleOutcome] = field(default_factory=list)
    cost: StrategyCost = field(default_factory=StrategyCost)
    # Where `cost` comes from: this process's engine counted it, or a remote server reported it.
    cost_basis: str = "engine"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SampleGroup:
    """k samples of one prompt on the local engine, as a stream of per-sample events."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: asyncio.Queue, k: int):
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.k = k
        self.texts = [""] * k
        self.num_tokens = [0] * k
        self.finish_reasons: list[str | None] = [None] * k
        self.abort_reasons: list[str | None] = [None] * k
        self.final: RequestOutput | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    async def next_events(self) -> list[tuple[int, str | None]]:
        """Wait for the next step's events; returns (sample index, finish reason) per event."""
        if self.final is not None:
            return []
        item = await self._stream.get()
        if isinstance(item, BaseException):
            raise EngineDeadError(f"the engine failed while running request {self.request_id}") from item
        return self._apply(item)

    def _apply(self, item: StreamItem) -> list[tuple[int, str | None]]:
        changes = []
        for event in item.events:
            i = event.sample_index
            self.texts[i] += event.text
            self.num_tokens[i] += len(event.token_ids)
            if event.finish_reason is not None:
                self.finish_reasons[i] = event.finish_reason
            changes.append((i, event.finish_reason))
        if item.final is not None:
            self.final = item.final
            for output in item.final.outputs:  # authoritative text (stop strings trimmed, flushes)
                self.texts[output.index] = output.text
                self.num_tokens[output.index] = len(output.token_ids)
                self.finish_reasons[output.index] = output.finish_reason
        return changes

    async def wait(self) -> RequestOutput:
        while self.final is None:
            await self.next_events()
        return self.final

    async def abort_sample(self, index: int, reason: str) -> None:
        rid = self.request_id

        def abort(engine) -> None:
            request = engine.requests.get(rid)
            if request is None:
                return
            for seq in request.sequences:
                if seq.sample_index == index:
                    engine.abort_sequence(seq)

        if self.finish_reasons[index] is None:
            self.abort_reasons[index] = reason
            await self.engine.call(abort)

    async def abort_rest(self, reason: str) -> RequestOutput:
        """Abort every unfinished sample; their KV blocks are free when this returns."""
        for i in range(self.k):
            if self.finish_reasons[i] is None:
                self.abort_reasons[i] = reason
        if self.final is None:
            await self.engine.abort(self.request_id)
        return await self.wait()


class LocalBackend:
    """Sample groups on an `AsyncEngine` in this process."""

    cost_basis = "engine"  # every token in the cost is one this process's engine computed

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        # FLOP per byte of this device, to price bytes moved as effective FLOPs (Kinetics).
        self.intensity, _ = device_intensity(engine.engine.device)

    async def start(self, prompt_token_ids: list[int], params: SamplingParams) -> SampleGroup:
        rid, stream = await self.engine.add_request(None, params, prompt_token_ids=list(prompt_token_ids))
        return SampleGroup(self.engine, rid, stream, params.n)


def outcomes(group: SampleGroup, extract) -> list[SampleOutcome]:
    """Every sample of a finished group, with its extracted answer."""
    return [
        SampleOutcome(
            index=i, text=group.texts[i], answer=extract(group.texts[i]),
            num_tokens=group.num_tokens[i], finish_reason=group.finish_reasons[i], abort_reason=group.abort_reasons[i],
        )
        for i in range(group.k)
    ]


async def sample_to_completion(backend: "LocalBackend", prompt_ids: list[int], params: SamplingParams,
                               extract) -> tuple[list[SampleOutcome], StrategyCost]:
    """Run `params.n` samples to the end; their outcomes and cost (wall time still open)."""
    group = await backend.start(prompt_ids, params)
    final = await group.wait()
    cost = StrategyCost(samples=params.n)
    cost.add(final.counts, backend.intensity)
    return outcomes(group, extract), cost


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
