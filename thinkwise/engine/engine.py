"""The engine: add requests, step, fork, force tokens, abort — one path for everything.

`Engine.step()` asks the scheduler for a batch, runs it, samples every sequence whose
pending tokens are all computed, hands the tokens to output processing (stops, thinking
budget, outputs) and frees what finished. A request with `n > 1` prefills its prompt
once: when that prefill completes, the sequence is forked n - 1 times (sharing every
prompt block) and all n samples draw their first token from the same logits. Strategies
drive sequences through `fork`, `force_tokens` and `abort_sequence`; all of them are
cheap, take effect between steps, and are accounted in the request's `TokenCounts`.

The jobs around the step live in classes of their own: `InputProcessor` (prompts,
templates, checks), `OutputProcessor` (detokenizing, stop rules, outputs), `StepPipeline`
(async scheduling: a decode step launched behind the one in flight), and below them the
`Scheduler` (which sequences run) and the `ModelRunner` (what the device does).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import torch

from thinkwise.cost.hardware import StepMeter
from thinkwise.cost.model_cost import ModelCostSpec, attribute_step
from thinkwise.engine.block_manager import BlockManager, blocks_for
from thinkwise.engine.config import EngineConfig, resolve_kv_cache_dtype, resolve_placement
from thinkwise.engine.detokenizer import IncrementalDetokenizer
from thinkwise.engine.gemm_profiling import profile_gemm_dispatch
from thinkwise.engine.input_processor import InputProcessor
from thinkwise.engine.kernel_settings import apply_kernel_settings
from thinkwise.engine.model_runner import ModelRunner, kv_cache_budget_bytes, kv_cache_description
from thinkwise.engine.output_processor import OutputProcessor, StepOutput, TokenEvent
from thinkwise.engine.outputs import RequestOutput
from thinkwise.engine.sampler import Sampler, mix_seed
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.scheduler import ScheduledBatch, Scheduler
from thinkwise.engine.sequence import Request, Sequence, SequenceStatus
from thinkwise.engine.step_pipeline import StepPipeline
from thinkwise.errors import CapacityError, InvalidParameterError
from thinkwise.kernels import cpu_decode_ops
from thinkwise.kernels.linear_dispatch import torch_threads
from thinkwise.kernels.linear_methods import quantize_model, quantized_cost_spec
from thinkwise.kernels.paged_attention import FP8_DECODE_PATHS, FP8_KV_DTYPE
from thinkwise.loading.config import LoadedModel
from thinkwise.reasoning.parser import resolve_parser

__all__ = ["Engine", "StepOutput", "TokenEvent"]


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        # Imported here: building a model imports the Triton kernels, which must follow TRITON_INTERPRET.
        from thinkwise.models import build_model

        self.config = config = config or EngineConfig()
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.model_name = loaded.name
        placement = resolve_placement(config)
        self.device, self.weight_dtype = placement.device, placement.weight_dtype
        # Everything past the weights (activations, KV cache, attention) runs in `dtype`.
        self.dtype = placement.compute_dtype
        self.layercast = self.dtype != self.weight_dtype
        # Before building the model: an fp8 cache on a GPU without fp8 fails at once.
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.device, self.dtype)
        apply_kernel_settings(config)  # before GEMM profiling and graph capture, which launch kernels
        # Each checkpoint tensor is freed as the model takes it: never two copies of the weights.
        model = build_model(loaded, device=self.device, dtype=self.weight_dtype, compute_dtype=self.dtype,
                            consume=True)
        # Before any dispatch table or graph: they see each layer's method (kernels/linear_methods).
        linear_methods = quantize_model(model, config.quantization, dtype=self.dtype, gguf_source=(
            loaded.source if (loaded.extra or {}).get("format") == "gguf" else None))
        self.run_metadata: dict[str, Any] = {"device": str(self.device), "dtype": str(self.weight_dtype),
                                             "compute_dtype": str(self.dtype), "linear_methods": linear_methods,
                                             "kv_cache_dtype": kv_cache_description(self.kv_cache_dtype)}
        if self.device.type == "cpu":
            self.run_metadata["cpu_decode_ops"] = cpu_decode_ops.record()
        elif self.kv_cache_dtype == FP8_KV_DTYPE:  # the Triton kernel's paths (a later fallback shows here)
            self.run_metadata["fp8_decode"] = FP8_DECODE_PATHS
        gemm_dispatch, self.cpu_threads = profile_gemm_dispatch(model, self.device, self.dtype, self.layercast, config)
        if gemm_dispatch is not None:
            self.run_metadata["gemm_dispatch"] = gemm_dispatch
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.cost_spec = quantized_cost_spec(
            ModelCostSpec.from_config(loaded.config, self.weight_dtype, kv_dtype=self.kv_cache_dtype), model)
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.runner = ModelRunner(
            model, loaded.config, device=self.device, dtype=self.dtype, num_blocks=num_blocks,
            block_size=config.block_size, max_model_len=self.max_model_len, cuda_graphs=config.cuda_graphs,
            max_num_seqs=config.max_num_seqs, unified_max_softmax=config.unified_max_softmax,
            cascade_min_shared_tokens=config.cascade_min_shared_tokens, kv_cache_dtype=self.kv_cache_dtype,
        )
        if self.runner.unified_max_stats is not None:
            self.run_metadata["unified_max_softmax"] = self.runner.unified_max_stats
        self.sampler = Sampler(self.device)
        self.reasoning_parser = resolve_parser(config.reasoning_parser, loaded.chat_template, loaded.tokenizer)
        self.step_meter = StepMeter(self.device)
        self.run_metadata["energy"] = "nvml" if self.step_meter.energy_available else "unavailable"
        self.eos_token_ids = set(loaded.config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._request_counter = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.inputs = InputProcessor(self.tokenizer, self.chat_template, vocab_size=loaded.config.vocab_size,
                                     max_model_len=self.max_model_len, num_kv_blocks=num_blocks,
                                     block_size=config.block_size,
                                     thinking_budget_message=config.thinking_budget_message)
        self.outputs = OutputProcessor(eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                                       requests=self.requests, finish=self._finish, force_tokens=self.force_tokens,
                                       reasoning_parser=self.reasoning_parser, tokenizer=self.tokenizer)
        # Async scheduling by default wherever decode steps replay as CUDA graphs.
        self.pipeline = StepPipeline(self, enabled=config.async_scheduling if config.async_scheduling is not None
                                     else self.runner.graph_decoder is not None)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = self.cost_spec.kv_bytes_per_token * cfg.block_size
        budget = kv_cache_budget_bytes(self.device, cfg)
        # Never more than every sequence at full context could use.
        useful = cfg.max_num_seqs * blocks_for(self.max_model_len, cfg.block_size)
        blocks = min(budget // per_block, useful)
        if blocks < 1:
            raise CapacityError("no memory is left for the KV cache; lower the model size or raise the memory budget")
        return int(blocks)

    # ------------------------------------------------------------------ requests
    @property
    def async_scheduling(self) -> bool:
        """Whether pure decode steps are launched behind the step in flight (settable between steps)."""
        return self.pipeline.enabled

    @async_scheduling.setter
    def async_scheduling(self, enabled: bool) -> None:
        self.pipeline.enabled = enabled

    def tokenize(self, prompt: str) -> list[int]:
        return self.inputs.tokenize(prompt)

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise the error `add_request` would for these prompt ids (nothing is queued)."""
        self.inputs.check_prompt(prompt_token_ids)

    def add_request(
        self,
        prompt: str | list[int] | None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        params = params or SamplingParams()
        prompt, prompt_token_ids = self.inputs.prompt_ids(prompt, prompt_token_ids)
        self.inputs.check_prompt(prompt_token_ids)
        thinking = self.inputs.thinking_markers(params)
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

    def request_output(self, request: Request) -> RequestOutput:
        """A snapshot of a request: every sample's text, tokens, finish state and counts."""
        return self.outputs.request_output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ primitives
    def fork(self, seq: Sequence, n: int) -> list[Sequence]:
        """n new samples continuing `seq`: they share all its KV blocks (copy-on-write)."""
        if seq.is_finished:
            raise InvalidParameterError("cannot fork a finished sequence", param="seq")
        self.pipeline.cancel(seq, keep_kv=False)  # parent and children each sample the same logits
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
        self.pipeline.cancel(seq, keep_kv=True)
        seq.token_ids.extend(token_ids)
        seq.request.counts.forced_tokens += len(token_ids)
        if seq.detokenizer is not None:
            for token in token_ids:
                seq.text += seq.detokenizer.add(token)

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
        return self.outputs.finalize(request)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.pipeline.cancel(seq, keep_kv=True)
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    # ------------------------------------------------------------------ stepping
    def step(self) -> StepOutput:
        """One engine step. With async scheduling a pure decode step is launched behind the
        one in flight and the in-flight step is read back while the GPU runs the new one;
        each call still returns exactly the tokens a synchronous step would have."""
        behind = self.pipeline.step_behind()
        if behind is not None:
            return behind
        drained = self.pipeline.drain()
        batch = self.scheduler.schedule()
        result = StepOutput(num_scheduled_tokens=batch.num_tokens, num_scheduled_seqs=len(batch))
        if batch.sequences:
            self._run(batch, result)
        else:
            self._check_progress(batch)
        result.prepend(drained)
        return result

    def _check_progress(self, batch: ScheduledBatch) -> None:
        """An empty batch is fine only while preemption makes room; otherwise it would loop forever."""
        if batch.preempted:
            return
        if self.scheduler.waiting and not self.scheduler.running:
            raise CapacityError("a waiting request does not fit the KV cache; raise --kv-blocks")
        if self.scheduler.running:
            # A running sequence must always have a token to compute.
            raise RuntimeError(f"internal error: running sequences with nothing to compute: "
                               f"{self.scheduler.running[:4]}")

    def _run(self, batch: ScheduledBatch, result: StepOutput) -> None:
        """Run the batch on the device, then sample every sequence whose pending tokens are done."""
        sequences, counts = batch.sequences, batch.num_new_tokens
        sample = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in zip(sequences, counts)]
        shared = self.runner.prefixes_read_once(batch)
        attribute_step(self.cost_spec, sequences, counts, sample, shared)
        ticket = self.step_meter.start()
        with torch_threads(self.cpu_threads):
            logits = self.runner.execute(sequences, counts, sample, self.block_manager.take_pending_copies(), shared)
        self.num_steps += 1
        for seq, n in zip(sequences, counts):
            seq.mark_computed(n)
            self.block_manager.register_computed_blocks(seq)
        targets, logits = self._fork_pending([seq for seq, s in zip(sequences, sample) if s], logits)
        if not targets:
            self.step_meter.charge(ticket, sequences, counts)  # cost: GPU time and energy of this step
            return
        rows = [self.outputs.sampling_row(seq) for seq in targets]
        if self.pipeline.can_launch(targets, counts, rows):
            self.pipeline.launch(targets, logits, rows, ticket, result)
            return
        with torch_threads(self.cpu_threads):
            drawn = self.sampler(logits, rows)
        for seq in targets:
            seq.redraw_on_host = False
        self.step_meter.charge(ticket, sequences, counts)  # after the sampler's host copy: adds no sync
        for i, seq in enumerate(targets):
            logprob = None
            if drawn.logprobs is not None and seq.params.logprobs is not None:
                logprob = {"token_id": drawn.token_ids[i], "logprob": drawn.logprobs[i], "top": drawn.top_logprobs[i]}
            confidence = drawn.confidence[i] if drawn.confidence is not None else None
            result.events.append(self.outputs.append_token(seq, drawn.token_ids[i], logprob, confidence))
        self.outputs.settle(targets, result)

    def _fork_pending(self, sampled: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Fork the samples of requests whose prompt prefill just completed; each fork
        draws from its parent's logits row. Returns the sequences to sample and their logits."""
        targets: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(sampled):
            group = [seq]
            if seq.request.pending_forks:
                group += self.fork(seq, seq.request.pending_forks)
                seq.request.pending_forks = 0
            targets += group
            rows += [row] * len(group)
        if len(rows) != len(sampled):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        return targets, logits
