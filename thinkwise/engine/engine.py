"""The engine: add requests, step, fork, force tokens, abort — one path for everything.

`Engine.step()` asks the scheduler for a batch, runs it, samples every sequence whose
pending tokens are all computed, appends the tokens, applies stop conditions and frees
what finished. A request with `n > 1` prefills its prompt once: when that prefill
completes, the sequence is forked n - 1 times (sharing every prompt block) and all n
samples draw their first token from the same logits. Strategies drive sequences
through `fork`, `force_tokens`, `extend` and `abort_sequence`; all of them are cheap,
take effect between steps, and are accounted in the request's `TokenCounts`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from thinkwise.cost.hardware import StepMeter
from thinkwise.cost.model_cost import ModelCostSpec, attribute_step
from thinkwise.engine.block_manager import BlockManager
from thinkwise.engine.config import EngineConfig, resolve_compute_dtype, resolve_device, resolve_dtype
from thinkwise.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from thinkwise.engine.model_runner import ModelRunner, kv_bytes_per_token
from thinkwise.engine.outputs import CompletionOutput, RequestOutput
from thinkwise.engine.sampler import Sampler, SamplingRow, mix_seed
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.scheduler import Scheduler, form_prefix_groups
from thinkwise.engine.sequence import Request, Sequence, SequenceStatus, TokenCounts
from thinkwise.kernels.linear_dispatch import GpuLinearDispatcher, LinearDispatcher, torch_threads
from thinkwise.errors import CapacityError, InvalidParameterError, PromptTooLongError
from thinkwise.loading.config import LoadedModel


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


# Async scheduling backs off from device top-p draws for REDO_BACKOFF_STEPS steps once
# REDO_LIMIT of the last REDO_WINDOW steps that drew top-p on the device needed a redo.
REDO_WINDOW = 32
REDO_LIMIT = 4
REDO_BACKOFF_STEPS = 256


@dataclass(eq=False)
class _InflightStep:
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


@dataclass
class StepOutput:
    finished: list[RequestOutput] = field(default_factory=list)  # requests completed this step
    events: list[TokenEvent] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    num_scheduled_seqs: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        from thinkwise.models import build_model

        self.config = config = config or EngineConfig()
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.model_name = loaded.name
        self.device = resolve_device(config.device)
        self.weight_dtype = resolve_dtype(config.dtype, self.device)
        # Everything past the weights (activations, KV cache, attention) runs in `dtype`.
        self.dtype = resolve_compute_dtype(config.compute_dtype, self.weight_dtype, self.device)
        self.layercast = self.dtype != self.weight_dtype
        model = build_model(loaded, device=self.device, dtype=self.weight_dtype, compute_dtype=self.dtype)
        loaded.weights.clear()  # the model holds its own copy; don't keep two
        self.run_metadata: dict[str, Any] = {"device": str(self.device), "dtype": str(self.weight_dtype),
                                             "compute_dtype": str(self.dtype)}
        self.cpu_threads = None
        if self.layercast:
            # One matmul implementation at every batch size (weights upcast, torch's fp32 GEMM):
            # a profiled table would make results depend on the rows in a step and on the run.
            self.run_metadata["gemm_dispatch"] = "off (compute_dtype differs from the weights' dtype)"
        elif self.device.type == "cpu" and config.cpu_gemm_dispatch:
            self.cpu_threads = config.cpu_torch_threads
            dispatcher = LinearDispatcher()
            with torch_threads(self.cpu_threads):
                dispatcher.profile(model, self.dtype, preset=config.cpu_gemm_table)
            self.run_metadata["gemm_dispatch"] = {"blas_from_rows": dispatcher.describe(),
                                                  "timings_ms": dispatcher.timings_ms}
        elif self.device.type == "cuda" and config.gpu_gemm_dispatch:
            # Before the runner captures CUDA graphs: they record whichever GEMM the table picks.
            gpu_dispatcher = GpuLinearDispatcher()
            gpu_dispatcher.profile(model, self.dtype)
            self.run_metadata["gemm_dispatch"] = gpu_dispatcher.describe()
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        num_blocks = self._num_kv_blocks(model)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            cascade_min_shared_tokens=config.cascade_min_shared_tokens if self.device.type == "cuda" else None,
        )
        self.runner = ModelRunner(
            model, loaded.config, device=self.device, dtype=self.dtype, num_blocks=num_blocks,
            block_size=config.block_size, max_model_len=self.max_model_len, cuda_graphs=config.cuda_graphs,
            max_num_seqs=config.max_num_seqs, unified_max_softmax=config.unified_max_softmax,
        )
        if self.runner.unified_max_stats is not None:
            self.run_metadata["unified_max_softmax"] = self.runner.unified_max_stats
        self.sampler = Sampler(self.device)
        self.cost_spec = ModelCostSpec.from_config(loaded.config, self.weight_dtype, kv_dtype=self.dtype)
        self.step_meter = StepMeter(self.device)
        self.run_metadata["energy"] = "nvml" if self.step_meter.energy_available else "unavailable"
        self.eos_token_ids = set(loaded.config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._request_counter = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.graph_decoder is not None)
        self._inflight: _InflightStep | None = None
        self.num_steps_behind = 0  # steps launched before the previous step was read back
        self.num_host_redraws = 0  # device draws redone on the host (wide top-p nucleus)
        self._redo_window: deque[bool] = deque(maxlen=REDO_WINDOW)  # recent steps drawing top-p: any redo?
        self._top_p_on_host_until = 0  # step number before which top-p rows draw on the host

    # ------------------------------------------------------------------ set-up
    def _num_kv_blocks(self, model: torch.nn.Module) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = kv_bytes_per_token(self.model_config, self.dtype) * cfg.block_size
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.gpu_memory_utilization) - (512 << 20)  # room for activations
        else:
            budget = int(cfg.kv_cache_memory_gb * (1 << 30))
        # Never more than every sequence at full context could use.
        useful = cfg.max_num_seqs * self.blocks_for(self.max_model_len)
        blocks = min(budget // per_block, useful)
        if blocks < 1:
            raise CapacityError("no memory is left for the KV cache; lower the model size or raise the memory budget")
        return int(blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.config.block_size - 1) // self.config.block_size

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError(
                "this model has no tokenizer, so prompts must be token ids (a list of ints)", param="prompt"
            )
        return list(self.tokenizer.encode(prompt))

    def add_request(
        self,
        prompt: str | list[int] | None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                prompt_token_ids = self.tokenize(prompt)
            elif isinstance(prompt, (list, tuple)):
                prompt_token_ids, prompt = list(prompt), None
            else:
                raise InvalidParameterError("prompt must be a string or a list of token ids", param="prompt")
        self._check_prompt(prompt_token_ids)
        thinking = self._thinking_markers(params)
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.requests:
            raise InvalidParameterError(f"request id {request_id!r} is already in use", param="request_id")
        request = Request(request_id, prompt, prompt_token_ids, params)
        request.thinking = thinking
        request.counts.prompt_tokens = len(prompt_token_ids)
        request.pending_forks = params.n - 1
        first = self._new_sequence(request, prompt_token_ids, sample_index=0)
        self.requests[request_id] = request
        self.scheduler.add(first)
        return request

    def _thinking_markers(self, params: SamplingParams) -> tuple[list[int], list[int]] | None:
        """Token ids of the end-of-thinking marker and of what is forced after it."""
        if params.thinking_budget is None and params.min_thinking_tokens == 0:
            return None
        if self.tokenizer is None:
            raise InvalidParameterError("thinking budgets need a tokenizer to find the end-of-thinking marker",
                                        param="thinking_budget")
        end = list(self.tokenizer.encode(params.thinking_end, add_special_tokens=False))
        forced = end + list(self.tokenizer.encode(params.answer_prefix, add_special_tokens=False))
        if params.min_thinking_tokens and len(end) != 1:
            raise InvalidParameterError(
                f"min_thinking_tokens needs an end-of-thinking marker that is one token; {params.thinking_end!r} "
                f"is {len(end)} tokens for this tokenizer",
                param="min_thinking_tokens",
            )
        return end, forced

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidParameterError("the prompt is empty; give at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise InvalidParameterError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the model's context holds {self.max_model_len} "
                "(prompt plus at least one generated token); shorten the prompt",
                param="prompt",
            )
        if self.blocks_for(len(ids) + 1) > self.block_manager.num_blocks:
            raise CapacityError(
                f"the prompt needs {self.blocks_for(len(ids) + 1)} KV blocks but the cache has only "
                f"{self.block_manager.num_blocks}; raise --kv-blocks (or the KV memory budget)"
            )

    def _new_sequence(self, request: Request, token_ids: list[int], sample_index: int) -> Sequence:
        params = request.params
        seed = mix_seed(params.seed, sample_index) if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request, token_ids, len(request.prompt_token_ids), sample_index, seed)
        seq.max_tokens = params.max_tokens
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
            )
        request.sequences.append(seq)
        return seq

    # ------------------------------------------------------------------ primitives
    def fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """n new samples continuing `seq`: they share all its KV blocks (copy-on-write)."""
        if seq.is_finished:
            raise InvalidParameterError("cannot fork a finished sequence", param="seq")
        self._cancel_inflight(seq, keep_kv=False)  # parent and children each sample the same logits
        request = seq.request
        children = []
        for _ in range(n):
            child = self._new_sequence(request, seq.token_ids, sample_index=len(request.sequences))
            child.max_tokens = seq.max_tokens
            child.text = seq.text
            child.output_logprobs = list(seq.output_logprobs)
            child.cumulative_logprob = seq.cumulative_logprob
            if seq.detokenizer is not None:
                child.detokenizer = seq.detokenizer.copy()
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.fork(seq, child)
                self.scheduler.add_running(child)
            else:
                self.scheduler.add(child)
            children.append(child)
        return children

    def force_tokens(self, seq: Sequence, token_ids: list[int]) -> None:
        """Append tokens the model did not sample (e.g. an end-of-thinking marker)."""
        if seq.is_finished:
            raise InvalidParameterError("cannot force tokens into a finished sequence", param="seq")
        self._cancel_inflight(seq, keep_kv=True)
        seq.token_ids.extend(token_ids)
        seq.request.counts.forced_tokens += len(token_ids)
        if seq.detokenizer is not None:
            for token in token_ids:
                seq.text += seq.detokenizer.add(token)

    def extend(self, seq: Sequence, extra_tokens: int) -> None:
        """Raise a sequence's output budget by `extra_tokens`."""
        if seq.max_tokens is not None:
            seq.max_tokens += extra_tokens

    def abort_sequence(self, seq: Sequence, reason: str = "abort") -> None:
        if seq.is_finished:
            return
        seq.request.counts.aborted_tokens += seq.num_output_tokens
        self._finish(seq, reason)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort every sample of a request; their blocks are free when this returns."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.pending_forks = 0
        for seq in request.sequences:
            self.abort_sequence(seq)
        return self._finalize(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ stepping
    def step(self) -> StepOutput:
        """One engine step. With async scheduling a pure decode step is launched behind the
        one in flight and the in-flight step is read back while the GPU runs the new one;
        each call still returns exactly the tokens a synchronous step would have."""
        if self._inflight is not None:
            result = self._step_behind()
            if result is not None:
                return result
            drained = StepOutput()
            self._read_back(self._inflight, drained)
            self._inflight = None
            result = self._step_scheduled()
            result.events[:0] = drained.events
            result.finished[:0] = drained.finished
            return result
        return self._step_scheduled()

    def _step_scheduled(self) -> StepOutput:
        batch = self.scheduler.schedule()
        result = StepOutput(num_scheduled_tokens=batch.num_tokens, num_scheduled_seqs=len(batch))
        if not batch.sequences:
            if self.scheduler.waiting and not self.scheduler.running and not batch.preempted:
                raise CapacityError("a waiting request does not fit the KV cache; raise --kv-blocks")
            if self.scheduler.running and not batch.preempted:
                # Would loop forever: a running sequence must always have a token to compute.
                raise RuntimeError(f"internal error: running sequences with nothing to compute: "
                                   f"{self.scheduler.running[:4]}")
            return result
        sequences, counts = batch.sequences, batch.num_new_tokens
        sample = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in zip(sequences, counts)]
        attribute_step(self.cost_spec, sequences, counts, sample, batch.prefix_groups)
        ticket = self.step_meter.start()
        with torch_threads(self.cpu_threads):
            logits = self.runner.execute(sequences, counts, sample, self.block_manager.take_pending_copies(),
                                         prefix_groups=batch.prefix_groups)
        self.num_steps += 1

        for seq, n in zip(sequences, counts):
            self._account_computed(seq, n)
            self.block_manager.register_computed_blocks(seq)

        targets: list[Sequence] = []
        rows: list[int] = []
        sampled = [seq for seq, s in zip(sequences, sample) if s]
        for row, seq in enumerate(sampled):
            group = [seq]
            if seq.request.pending_forks:
                group += self.fork(seq, seq.request.pending_forks)
                seq.request.pending_forks = 0
            targets += group
            rows += [row] * len(group)
        if not targets:
            self.step_meter.charge(ticket, sequences, counts)  # cost: GPU time and energy of this step
            return result
        if len(rows) != len(sampled):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        sampling_rows = [self._sampling_row(seq) for seq in targets]
        if (self.async_scheduling and len(targets) == len(sequences) and all(n == 1 for n in counts)
                and all(self._drawable_on_device(row) for row in sampling_rows)
                and not any(seq.redraw_on_host for seq in targets)):
            # Pure decode: keep the tokens on the device, launch the next step behind this
            # one, then read this one back while the GPU works.
            with torch_threads(self.cpu_threads):
                tokens, redo = self.sampler.draw(logits, sampling_rows)
                confidence = self.sampler.confidence(logits, sampling_rows)
            self.step_meter.end(ticket)
            launched = _InflightStep(list(targets), tokens, [True] * len(targets), ticket, redo,
                                     confidence=confidence)
            for row, seq in enumerate(targets):
                seq.inflight = (launched, row)
            self._inflight = self._launch_behind(launched)
            self._read_back(launched, result)
            return result
        with torch_threads(self.cpu_threads):
            drawn = self.sampler(logits, sampling_rows)
        for seq in targets:
            seq.redraw_on_host = False
        self.step_meter.charge(ticket, sequences, counts)  # after the sampler's host copy: adds no sync
        for i, seq in enumerate(targets):
            logprob = None
            if drawn.logprobs is not None and seq.params.logprobs is not None:
                logprob = {"token_id": drawn.token_ids[i], "logprob": drawn.logprobs[i], "top": drawn.top_logprobs[i]}
            confidence = drawn.confidence[i] if drawn.confidence is not None else None
            result.events.append(self._append_token(seq, drawn.token_ids[i], logprob, confidence))
        self._settle(targets, result)
        return result

    def _settle(self, sequences: list[Sequence], result: StepOutput) -> None:
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
                result.finished.append(self._finalize(request))

    # ------------------------------------------------------------------ async scheduling
    def _step_behind(self) -> StepOutput | None:
        """Launch the next decode step behind the one in flight and read that one back; None
        when the next step is not a pure continuation (new requests wait, a sequence left
        the pipeline), in which case the caller drains and schedules normally."""
        inflight = self._inflight
        live = [seq for row, seq in enumerate(inflight.sequences) if inflight.attached[row] and not seq.is_finished]
        if not live or self.scheduler.waiting or len(live) != len(self.scheduler.running):
            return None
        behind = self._launch_behind(inflight)
        if behind is None:
            return None
        result = StepOutput(num_scheduled_tokens=len(behind.sequences), num_scheduled_seqs=len(behind.sequences))
        self._read_back(inflight, result)
        self._inflight = behind
        return result

    def _launch_behind(self, ahead: "_InflightStep") -> "_InflightStep | None":
        """Launch one decode step for `ahead`'s sequences, fed by the tokens `ahead` sampled
        (still on the device). Sequences that its token will end for sure (length limits)
        are left out; so is any whose next draw needs the host or which finds no free slot."""
        members: list[tuple[Sequence, int, SamplingRow]] = []
        for row, seq in enumerate(ahead.sequences):
            if (not ahead.attached[row] or seq.is_finished or seq.request.pending_forks or seq.redraw_on_host
                    or (seq.max_tokens is not None and seq.num_output_tokens + 1 >= seq.max_tokens)
                    or seq.num_tokens + 1 >= self.max_model_len):
                continue
            sampling_row = self._sampling_row(seq, ahead=1)
            if self._drawable_on_device(sampling_row):
                members.append((seq, row, sampling_row))
        if not members or not self.runner.can_feed([seq for seq, _, _ in members]):
            return None
        # The slot for the position this step computes (one past the host's tokens).
        members = [m for m in members if self.block_manager.allocate_slots(m[0], 1)]
        kept = [seq for seq, _, _ in members]
        kept_rows = [row for _, row, _ in members]
        if not kept:
            return None
        ones = [1] * len(kept)
        groups = []
        if self.scheduler.cascade_min_shared_tokens is not None:
            groups = form_prefix_groups(kept, ones, self.config.block_size, self.scheduler.cascade_min_shared_tokens)
        attribute_step(self.cost_spec, kept, ones, [True] * len(kept), groups)
        ticket = self.step_meter.start()
        with torch_threads(self.cpu_threads):
            logits = self.runner.execute_fed(kept, self.block_manager.take_pending_copies(), groups, ahead.tokens,
                                             kept_rows)
            member_rows = [sampling_row for _, _, sampling_row in members]
            tokens, redo = self.sampler.draw(logits, member_rows)
            confidence = self.sampler.confidence(logits, member_rows)
        self.step_meter.end(ticket)
        self.num_steps += 1
        self.num_steps_behind += 1
        behind = _InflightStep(kept, tokens, [True] * len(kept), ticket, redo, confidence=confidence)
        for row, seq in enumerate(kept):
            self._account_computed(seq, 1)
            seq.inflight = (behind, row)
        return behind

    def _read_back(self, step: "_InflightStep", result: StepOutput) -> None:
        """Bring a launched step's tokens to the host (waiting only for that step) and apply
        them as a synchronous step would; samples cancelled meanwhile are skipped."""
        token_ids, redo = step.read()
        confidences = step.confidences()
        self.step_meter.charge(step.ticket, step.sequences, [1] * len(step.sequences))
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
                self._cancel_inflight(seq, keep_kv=True)
                self._recompute_last(seq)
                seq.redraw_on_host = True
                self.num_host_redraws += 1
                redone = True
                continue
            self.block_manager.register_computed_blocks(seq)  # before a finish frees its blocks
            confidence = confidences[row] if confidences is not None else None
            result.events.append(self._append_token(seq, token_ids[row], None, confidence))
            if not seq.is_finished:
                self.block_manager.register_computed_blocks(seq)  # now its newest token is known
            appended.append(seq)
        self._settle(appended, result)
        if step.redo is not None:
            self._note_redo(redone)

    def _note_redo(self, redone: bool) -> None:
        """Each redo costs a recomputed step. Where wide top-p nuclei are common (flat
        distributions, e.g. random weights), stop drawing top-p rows on the device for a
        while: then steps with them run synchronously, which is cheaper than redoing."""
        window = self._redo_window
        window.append(redone)
        if sum(window) >= REDO_LIMIT:
            self._top_p_on_host_until = self.num_steps + REDO_BACKOFF_STEPS
            window.clear()

    def _drawable_on_device(self, row: SamplingRow) -> bool:
        if not Sampler.device_ready(row):
            return False
        return row.temperature == 0 or row.top_p >= 1 or self.num_steps >= self._top_p_on_host_until

    def _cancel_inflight(self, seq: Sequence, keep_kv: bool) -> None:
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
            self._recompute_last(seq)

    def _recompute_last(self, seq: Sequence) -> None:
        """Make the sequence's last token pending again, with the block table a synchronous
        engine would have (a block allocated ahead would change the CUDA-graph bucket)."""
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.trim(seq, seq.num_tokens)

    def _account_computed(self, seq: Sequence, n: int) -> None:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        counts = seq.request.counts
        counts.prompt_tokens_computed += max(0, min(end, seq.num_prompt_tokens) - start)
        counts.recomputed_tokens += max(0, min(end, seq.max_computed_tokens) - max(start, seq.num_prompt_tokens))
        seq.num_computed_tokens = end
        seq.max_computed_tokens = max(seq.max_computed_tokens, end)

    def _sampling_row(self, seq: Sequence, ahead: int = 0) -> SamplingRow:
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
        return SamplingRow(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=seq.seed,
            position=position, logprobs=p.logprobs, banned_token_ids=banned, confidence_k=p.confidence_top_k,
        )

    def _append_token(self, seq: Sequence, token: int, logprob: dict | None,
                      confidence: float | None = None) -> TokenEvent:
        params = seq.params
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
        reason, stop_reason = None, None
        past_min = seq.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif past_min and token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif past_min and params.stop and delta:
            found = find_stop_string(seq.text, len(delta), params.stop)
            if found is not None:
                index, stop = found
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                reason, stop_reason = "stop", stop
        if reason is None:
            if seq.max_tokens is not None and seq.num_output_tokens >= seq.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is None and seq.request.thinking and seq.thinking_tokens is None:
            event.token_ids += self._apply_thinking_budget(seq)
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                if seq.detokenizer is not None:
                    seq.text += seq.detokenizer.flush()
            self._finish(seq, reason, stop_reason)
            event.finish_reason = reason
            event.final_text = seq.text
        # The text event is what the visible text gained (a stop string may have cut it).
        event.text = seq.text[text_before:] if len(seq.text) >= text_before else ""
        return event

    def _apply_thinking_budget(self, seq: Sequence) -> list[int]:
        """Note where thinking ended, or force its end at the budget; returns forced ids."""
        end, forced = seq.request.thinking
        output = seq.token_ids[seq.num_prompt_tokens :]
        if len(output) >= len(end) and output[-len(end) :] == end:
            seq.thinking_tokens = len(output) - len(end)
        elif seq.params.thinking_budget is not None and len(output) >= seq.params.thinking_budget:
            seq.thinking_tokens = len(output)
            seq.thinking_forced = True
            self.force_tokens(seq, forced)
            return list(forced)
        return []

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self._cancel_inflight(seq, keep_kv=True)
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _finalize(self, request: Request) -> RequestOutput:
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
        )
