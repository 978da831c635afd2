"""Async scheduling: launch the next decode step before this one's tokens reach the host.

On a GPU the host's per-step work (reading tokens back, stop checks, scheduling) would
leave the device idle between steps. When a step is a pure decode continuation, its
sampled tokens stay on the device (`InflightStep`), the next step is launched fed by
them (`ModelRunner.execute_fed`), and only then is the first step read back, while the
device runs the second. Every step still hands callers exactly the tokens a synchronous
step would: a sequence a primitive changed meanwhile (fork, force, abort) has its sample
cancelled (`cancel`), and a device top-p draw that cannot be exact (the nucleus is wider
than the candidates drawn from) is redone on the host one step later, backing off from
device top-p draws where redos are common.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from thinkwise.cost.hardware import StepMeter
from thinkwise.cost.model_cost import ModelCostSpec, attribute_step
from thinkwise.engine.block_manager import BlockManager
from thinkwise.engine.model_runner import ModelRunner
from thinkwise.engine.output_processor import OutputProcessor, StepOutput
from thinkwise.engine.sampler import Sampler, SamplingRow
from thinkwise.engine.scheduler import ScheduledBatch, Scheduler
from thinkwise.engine.sequence import Sequence
from thinkwise.kernels.linear_dispatch import torch_threads

# Async scheduling backs off from device top-p draws for REDO_BACKOFF_STEPS steps once
# REDO_LIMIT of the last REDO_WINDOW steps that drew top-p on the device needed a redo.
REDO_WINDOW = 32
REDO_LIMIT = 4
REDO_BACKOFF_STEPS = 256


class EngineParts(Protocol):
    """What the pipeline uses of the engine it runs for (`Engine` provides all of it)."""

    scheduler: Scheduler
    block_manager: BlockManager
    runner: ModelRunner
    sampler: Sampler
    outputs: OutputProcessor
    step_meter: StepMeter
    cost_spec: ModelCostSpec
    cpu_threads: int | None
    max_model_len: int
    num_steps: int  # the engine's step counter; launches behind count as steps


@dataclass(eq=False)
class InflightStep:
    """A launched decode step whose sampled tokens are still on the device."""

    sequences: list[Sequence]
    tokens: torch.Tensor  # [len(sequences)] sampled token ids, on the device
    attached: list[bool]  # False once a sequence's sample was cancelled (it changed meanwhile)
    ticket: Any  # StepMeter ticket
    redo: torch.Tensor | None = None  # rows whose draw must be redone exactly on the host
    host_copy: torch.Tensor | None = None  # pinned [tokens; redo], filled when `copied` fires (CUDA)
    copied: Any = None  # CUDA event after the copy
    confidence: torch.Tensor | None = None  # per-row token confidence (DeepConf), on the device
    host_confidence: torch.Tensor | None = None  # its pinned host copy, under the same event

    def __post_init__(self) -> None:
        packed = self.tokens if self.redo is None else torch.stack([self.tokens, self.redo.long()])
        if packed.is_cuda:
            # Queue the copy to the host now: a plain .tolist() at read-back would sit in
            # the stream behind the step launched since, and wait for that one too.
            self.host_copy = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host_copy.copy_(packed, non_blocking=True)
            if self.confidence is not None:  # rides the same read-back: one event, no extra sync
                self.host_confidence = torch.empty(self.confidence.shape, dtype=self.confidence.dtype,
                                                   pin_memory=True)
                self.host_confidence.copy_(self.confidence, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host_copy = packed
            self.host_confidence = self.confidence

    def confidences(self) -> list[float] | None:
        """Per-row token confidences on the host (after `read`, which waited for the copy)."""
        return None if self.host_confidence is None else self.host_confidence.tolist()

    def read(self) -> tuple[list[int], list[bool]]:
        """Token ids and redo flags, on the host (waits for this step only)."""
        if self.copied is not None:
            self.copied.synchronize()
        values = self.host_copy.tolist()
        if self.redo is None:
            return values, [False] * len(values)
        return values[0], [bool(v) for v in values[1]]


class StepPipeline:
    """The engine's step in flight, if any, and the steps launched behind it."""

    def __init__(self, engine: EngineParts, enabled: bool):
        self.engine = engine
        self.enabled = enabled
        self.inflight: InflightStep | None = None
        self.num_steps_behind = 0  # steps launched before the previous step was read back
        self.num_host_redraws = 0  # device draws redone on the host (wide top-p nucleus)
        self.redo_window: deque[bool] = deque(maxlen=REDO_WINDOW)  # recent steps drawing top-p: any redo?
        self.top_p_on_host_until = 0  # step number before which top-p rows draw on the host

    # ------------------------------------------------------------------ the engine's step
    def step_behind(self) -> StepOutput | None:
        """Launch the next decode step behind the one in flight and read that one back; None
        when the next step is not a pure continuation (new requests wait, a sequence left
        the pipeline), in which case the caller drains and schedules normally."""
        inflight, scheduler = self.inflight, self.engine.scheduler
        if inflight is None:
            return None
        live = [seq for row, seq in enumerate(inflight.sequences) if inflight.attached[row] and not seq.is_finished]
        if not live or scheduler.waiting or len(live) != len(scheduler.running):
            return None
        behind = self.launch_behind(inflight)
        if behind is None:
            return None
        result = StepOutput(num_scheduled_tokens=len(behind.sequences), num_scheduled_seqs=len(behind.sequences))
        self.read_back(inflight, result)
        self.inflight = behind
        return result

    def drain(self) -> StepOutput:
        """Read back the step in flight, if any (the next step is scheduled normally)."""
        drained = StepOutput()
        if self.inflight is not None:
            self.read_back(self.inflight, drained)
            self.inflight = None
        return drained

    def can_launch(self, targets: list[Sequence], counts: list[int], rows: list[SamplingRow]) -> bool:
        """Whether a scheduled step's tokens may stay on the device: a pure decode step of
        every scheduled sequence whose draws are all exact on the device."""
        return (self.enabled and len(targets) == len(counts) and all(n == 1 for n in counts)
                and all(self.drawable_on_device(row) for row in rows)
                and not any(seq.redraw_on_host for seq in targets))

    def launch(self, targets: list[Sequence], logits: torch.Tensor, rows: list[SamplingRow], ticket: Any,
               result: StepOutput) -> None:
        """Pure decode: keep the tokens on the device, launch the next step behind this
        one, then read this one back while the GPU works."""
        engine = self.engine
        with torch_threads(engine.cpu_threads):
            tokens, redo = engine.sampler.draw(logits, rows)
            confidence = engine.sampler.confidence(logits, rows)
        engine.step_meter.end(ticket)
        launched = InflightStep(list(targets), tokens, [True] * len(targets), ticket, redo, confidence=confidence)
        for row, seq in enumerate(targets):
            seq.inflight = (launched, row)
        self.inflight = self.launch_behind(launched)
        self.read_back(launched, result)

    # ------------------------------------------------------------------ launching and reading back
    def launch_behind(self, ahead: InflightStep) -> InflightStep | None:
        """Launch one decode step for `ahead`'s sequences, fed by the tokens `ahead` sampled
        (still on the device). Sequences that its token will end for sure (length limits)
        are left out; so is any whose next draw needs the host or which finds no free slot."""
        engine = self.engine
        members: list[tuple[Sequence, int, SamplingRow]] = []
        for row, seq in enumerate(ahead.sequences):
            if (not ahead.attached[row] or seq.is_finished or seq.request.pending_forks or seq.redraw_on_host
                    or (seq.max_tokens is not None and seq.num_output_tokens + 1 >= seq.max_tokens)
                    or seq.num_tokens + 1 >= engine.max_model_len):
                continue
            sampling_row = engine.outputs.sampling_row(seq, ahead=1)
            if self.drawable_on_device(sampling_row):
                members.append((seq, row, sampling_row))
        if not members or not engine.runner.can_feed([seq for seq, _, _ in members]):
            return None
        # The slot for the position this step computes (one past the host's tokens).
        members = [m for m in members if engine.block_manager.allocate_slots(m[0], 1)]
        kept = [seq for seq, _, _ in members]
        kept_rows = [row for _, row, _ in members]
        if not kept:
            return None
        ones = [1] * len(kept)
        behind_batch = ScheduledBatch(kept, ones, block_size=engine.block_manager.block_size)
        shared = engine.runner.prefixes_read_once(behind_batch)
        attribute_step(engine.cost_spec, kept, ones, [True] * len(kept), shared)
        ticket = engine.step_meter.start()
        with torch_threads(engine.cpu_threads):
            logits = engine.runner.execute_fed(kept, engine.block_manager.take_pending_copies(), shared, ahead.tokens,
                                               kept_rows)
            member_rows = [sampling_row for _, _, sampling_row in members]
            tokens, redo = engine.sampler.draw(logits, member_rows)
            confidence = engine.sampler.confidence(logits, member_rows)
        engine.step_meter.end(ticket)
        engine.num_steps += 1
        self.num_steps_behind += 1
        behind = InflightStep(kept, tokens, [True] * len(kept), ticket, redo, confidence=confidence)
        for row, seq in enumerate(kept):
            seq.mark_computed(1)
            seq.inflight = (behind, row)
        return behind

    def read_back(self, step: InflightStep, result: StepOutput) -> None:
        """Bring a launched step's tokens to the host (waiting only for that step) and apply
        them as a synchronous step would; samples cancelled meanwhile are skipped."""
        engine = self.engine
        block_manager = engine.block_manager
        token_ids, redo = step.read()
        confidences = step.confidences()
        engine.step_meter.charge(step.ticket, step.sequences, [1] * len(step.sequences))
        redone = False
        appended: list[Sequence] = []
        for row, seq in enumerate(step.sequences):
            if seq.inflight is not None and seq.inflight[0] is step:
                seq.inflight = None
            if not step.attached[row] or seq.is_finished:
                continue
            if redo[row]:
                # A top-p nucleus wider than the device draw's candidates: recompute the last
                # token and draw exactly on the host; the token arrives one step later, the
                # same token a synchronous step draws (a function of seed, position, logits).
                self.cancel(seq, keep_kv=True)
                self.recompute_last(seq)
                seq.redraw_on_host = True
                self.num_host_redraws += 1
                redone = True
                continue
            block_manager.register_computed_blocks(seq)  # before a finish frees its blocks
            confidence = confidences[row] if confidences is not None else None
            result.events.append(engine.outputs.append_token(seq, token_ids[row], None, confidence))
            if not seq.is_finished:
                block_manager.register_computed_blocks(seq)  # now its newest token is known
            appended.append(seq)
        engine.outputs.settle(appended, result)
        if step.redo is not None:
            self.note_redo(redone)

    # ------------------------------------------------------------------ exact draws
    def note_redo(self, redone: bool) -> None:
        """Each redo costs a recomputed step. Where wide top-p nuclei are common (flat
        distributions, e.g. random weights), stop drawing top-p rows on the device for a
        while: then steps with them run synchronously, which is cheaper than redoing."""
        window = self.redo_window
        window.append(redone)
        if sum(window) >= REDO_LIMIT:
            self.top_p_on_host_until = self.engine.num_steps + REDO_BACKOFF_STEPS
            window.clear()

    def drawable_on_device(self, row: SamplingRow) -> bool:
        if not Sampler.device_ready(row):
            return False
        return row.temperature == 0 or row.top_p >= 1 or self.engine.num_steps >= self.top_p_on_host_until

    # ------------------------------------------------------------------ primitives between steps
    def cancel(self, seq: Sequence, keep_kv: bool) -> None:
        """Drop a sequence's sample from the step in flight (a primitive changed the
        sequence). The step still writes the KV of the sequence's last token; `keep_kv`
        counts it as computed (tokens are about to be appended after it), otherwise it is
        recomputed by the next step, whose logits then give the sample it needs."""
        if seq.inflight is None:
            return
        step, row = seq.inflight
        step.attached[row] = False
        seq.inflight = None
        if not keep_kv:
            self.recompute_last(seq)

    def recompute_last(self, seq: Sequence) -> None:
        """Make the sequence's last token pending again, with the block table a synchronous
        engine would have (a block allocated ahead would change the CUDA-graph bucket)."""
        seq.num_computed_tokens = seq.num_tokens - 1
        self.engine.block_manager.trim(seq, seq.num_tokens)
