"""What every strategy shares: its result (`Answer`), its cost, and the sample groups it drives.

A strategy asks a `Backend` for a `SampleGroup`: k samples of one prompt that share the
prompt's prefill and KV blocks. It watches the group's events (tokens, text, finishes)
and acts between engine steps: abort one sample or all, fork probes. `SampleGroup` and
`Backend` are typing protocols that strategies are written against; `LocalBackend`
(this module) and `remote.RemoteBackend` implement them. `LocalBackend` runs groups on
this process's `AsyncEngine`, so strategies run concurrently with ordinary requests and
every token they report is one the engine counted; only it can fork copy-on-write
probes (`LocalSampleGroup.probe`). `Answer.cost` is filled from the engine's own
`TokenCounts`, summed over every request the strategy issued.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

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
    probes: int = 0  # answer probes forked off chains (probe strategies)
    probe_tokens: int = 0  # tokens the probes decoded (already in decode_tokens; their forced cue is in forced_tokens)
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


class GroupOutput(Protocol):
    counts: TokenCounts


@runtime_checkable
class SampleGroup(Protocol):
    """k samples of one prompt, seen as per-sample state plus a stream of events.

    `texts`, `num_tokens`, `finish_reasons` ("stop", "length", "abort"), `abort_reasons`
    and `token_confidences` (per sampled token, when the params asked for
    `confidence_top_k`; empty lists otherwise) are indexed by sample. `next_events`
    waits for the next step and returns (sample index, finish reason or None) per change;
    `done` turns true once every sample ended and `final.counts` holds the cost."""

    k: int
    texts: list[str]
    num_tokens: list[int]
    finish_reasons: list[str | None]
    abort_reasons: list[str | None]
    token_confidences: list[list[float]]

    @property
    def done(self) -> bool: ...

    async def next_events(self) -> list[tuple[int, str | None]]: ...

    async def wait(self) -> GroupOutput: ...

    async def abort_sample(self, index: int, reason: str) -> None: ...

    async def abort_rest(self, reason: str) -> GroupOutput: ...


@runtime_checkable
class Backend(Protocol):
    """Where sample groups run: `start(prompt, params)` gives a group of `params.n` samples."""

    cost_basis: str
    intensity: float  # FLOP per byte of the device (0: unknown), to price bytes as effective FLOPs
    is_local: bool  # True: this process's engine (probes, exact engine counts)

    async def start(self, prompt: Any, params: SamplingParams) -> SampleGroup: ...


class LocalSampleGroup:
    """k samples of one prompt on the local engine, as a stream of per-sample events.

    Probes forked off a sample (`probe`) are sequences of the same engine request with a
    sample index >= k: their events never reach `next_events`' result; their text is in
    `probe_texts` and each finished probe's index is queued in `probes_finished`."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: asyncio.Queue, k: int):
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.k = k
        self.texts = [""] * k
        self.num_tokens = [0] * k
        self.finish_reasons: list[str | None] = [None] * k
        self.abort_reasons: list[str | None] = [None] * k
        self.token_confidences: list[list[float]] = [[] for _ in range(k)]
        self.final: RequestOutput | None = None
        self.probe_texts: dict[int, str] = {}  # probe sample index -> the text it decoded
        self.probe_finish: dict[int, str | None] = {}
        self.probes_finished: list[int] = []  # probe indices in the order they ended (consumers pop them)
        self.probes = 0
        self.probe_tokens = 0

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
            if i >= self.k:
                self._apply_probe(i, event)
                continue
            self.texts[i] += event.text
            self.num_tokens[i] += len(event.token_ids)
            confidence = getattr(event, "confidence", None)
            if confidence is not None:
                self.token_confidences[i].append(confidence)
            if event.finish_reason is not None:
                self.finish_reasons[i] = event.finish_reason
            changes.append((i, event.finish_reason))
        if item.final is not None:
            self.final = item.final
            for output in item.final.outputs:  # authoritative text (stop strings trimmed, flushes)
                if output.index >= self.k:
                    if self.probe_finish.get(output.index) is None:
                        self.probe_finish[output.index] = output.finish_reason or "abort"
                        self.probes_finished.append(output.index)
                    continue
                self.texts[output.index] = output.text
                self.num_tokens[output.index] = len(output.token_ids)
                self.finish_reasons[output.index] = output.finish_reason
        return changes

    def _apply_probe(self, index: int, event) -> None:
        self.probe_texts[index] = self.probe_texts.get(index, "") + event.text
        self.probe_tokens += len(event.token_ids)
        if event.finish_reason is not None and self.probe_finish.get(index) is None:
            self.probe_finish[index] = event.finish_reason
            self.probes_finished.append(index)

    async def wait(self) -> RequestOutput:
        while self.final is None:
            await self.next_events()
        return self.final

    async def probe(self, index: int, cue_ids: list[int], max_tokens: int) -> int | None:
        """Fork a copy-on-write probe off sample `index`: it shares the sample's KV blocks, is
        forced `cue_ids` (e.g. the end-of-thinking marker and an answer prefix) and decodes at
        most `max_tokens` tokens, then ends and frees its own blocks. Returns the probe's
        index (>= k), or None when the sample (or the whole request) has already ended."""
        rid = self.request_id

        def fork(engine) -> int | None:
            request = engine.requests.get(rid)
            if request is None:
                return None
            seq = next((s for s in request.sequences if s.sample_index == index), None)
            if seq is None or seq.is_finished:
                return None
            child = engine.fork(seq, 1)[0]
            engine.force_tokens(child, list(cue_ids))
            child.max_tokens = child.num_output_tokens + max_tokens
            return child.sample_index

        if self.final is not None or self.finish_reasons[index] is not None:
            return None
        probe_index = await self.engine.call(fork)
        if probe_index is not None:
            self.probes += 1
            self.probe_texts.setdefault(probe_index, "")
            self.probe_finish.setdefault(probe_index, None)
        return probe_index

    async def abort_sample(self, index: int, reason: str) -> None:
        rid = self.request_id

        def abort(engine) -> bool:
            request = engine.requests.get(rid)
            if request is None:
                return False
            for seq in request.sequences:
                if seq.sample_index == index:
                    engine.abort_sequence(seq)
            return request.is_finished

        if self.finish_reasons[index] is None:
            self.abort_reasons[index] = reason
            if await self.engine.call(abort):
                # It was the last live sequence: no step will finish the request, so settle it
                # here (its final output reaches this group's stream).
                await self.engine.abort(rid)

    async def abort_rest(self, reason: str) -> RequestOutput:
        """Abort every unfinished sample; their KV blocks are free when this returns."""
        for i in range(self.k):
            if self.finish_reasons[i] is None and self.abort_reasons[i] is None:  # keep an earlier abort's reason
                self.abort_reasons[i] = reason
        if self.final is None:
            await self.engine.abort(self.request_id)
        return await self.wait()


class LocalBackend:
    """Sample groups on an `AsyncEngine` in this process."""

    cost_basis = "engine"  # every token in the cost is one this process's engine computed
    is_local = True

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        # FLOP per byte of this device, to price bytes moved as effective FLOPs (Kinetics).
        self.intensity, _ = device_intensity(engine.engine.device)

    async def start(self, prompt_token_ids: list[int], params: SamplingParams) -> LocalSampleGroup:
        rid, stream = await self.engine.add_request(None, params, prompt_token_ids=list(prompt_token_ids))
        return LocalSampleGroup(self.engine, rid, stream, params.n)


def outcomes(group: SampleGroup, extract) -> list[SampleOutcome]:
    """Every sample of a finished group, with its extracted answer."""
    return [
        SampleOutcome(
            index=i, text=group.texts[i], answer=extract(group.texts[i]),
            num_tokens=group.num_tokens[i], finish_reason=group.finish_reasons[i], abort_reason=group.abort_reasons[i],
        )
        for i in range(group.k)
    ]


async def sample_to_completion(backend: Backend, prompt_ids: list[int], params: SamplingParams,
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
