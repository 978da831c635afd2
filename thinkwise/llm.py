"""The offline Python API: `LLM(model).generate(...)` and `.chat(...)`.

A thin synchronous wrapper over `Engine`: it queues every prompt as a request and steps
the engine until all are done, so prompts of one call (and their `n` samples) are
batched together exactly as concurrent server requests would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, replace
from typing import Any

from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.engine.config import EngineConfig, resolve_placement
from thinkwise.engine.engine import Engine, TokenEvent
from thinkwise.engine.input_processor import Prompt
from thinkwise.engine.outputs import RequestOutput
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.loading import load_model
from thinkwise.strategies import LocalBackend, parse_strategy, run_strategy


@dataclass
class StrategyJob:
    """One strategy run for `LLM.run_strategy_jobs`: `spec` from `strategies.parse_strategy`,
    `extract` a method name or a callable (text -> answer key)."""

    prompt: Any
    spec: Any
    params: SamplingParams
    extract: Any = "auto"
    verifier: Any = None
    use_chat_template: bool | None = None


class LLM:
    def __init__(self, model: str = "default", *, progress: bool = False, cache_dir: str | None = None, **engine_options):
        config = EngineConfig(**engine_options)
        # The weights load in the dtype the engine stores them in (the engine resolves it the same way).
        loaded = load_model(model, dtype=resolve_placement(config).weight_dtype, progress=progress,
                            cache_dir=cache_dir)
        self.engine = Engine(loaded, config)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_loaded(cls, loaded, **engine_options) -> "LLM":
        """Build from an already loaded model (tests, embedding applications)."""
        llm = cls.__new__(cls)
        llm.engine = Engine(loaded, EngineConfig(**engine_options))
        llm.tokenizer = llm.engine.tokenizer
        return llm

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        on_events: Callable[[list[TokenEvent]], None] | None = None,
    ) -> list[RequestOutput]:
        """`on_events`, if given, receives every step's `TokenEvent`s as they happen (streaming)."""
        prompt_list = self._normalize_prompts(prompts)
        params_list = self._normalize_params(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm, on_events)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        use_tqdm: bool = False,
        on_events: Callable[[list[TokenEvent]], None] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them. Template
        variables (e.g. `chat_template_kwargs={"enable_thinking": False}`) go to the chat
        template; `reasoning_effort` ("low", "medium", "high") sets the thinking budget the
        engine's config maps it to; each output's `reasoning_text` / `answer_text` split its thinking."""
        if not messages:
            raise InvalidParameterError("messages is empty; give at least one message", param="messages")
        if chat_template_kwargs is not None:
            if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
                raise InvalidParameterError("chat_template_kwargs must be a dict of template variable names to "
                                            "values, e.g. {'enable_thinking': False}", param="chat_template_kwargs")
            clash = {"conversation", "add_generation_prompt", "chat_template", "tokenize"} & set(chat_template_kwargs)
            if clash:
                raise InvalidParameterError(f"chat_template_kwargs cannot set {sorted(clash)}: pass them as chat() "
                                            "arguments", param="chat_template_kwargs")
            template_kwargs = {**chat_template_kwargs, **template_kwargs}
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                          chat_template=chat_template, **template_kwargs)}
            for c in conversations
        ]
        params_list = self._normalize_params(sampling_params, len(prompts))
        if reasoning_effort is not None:
            budget = self.effort_budget(reasoning_effort)
            params_list = [replace(p, thinking_budget=budget) for p in params_list]
        return self._run(prompts, params_list, use_tqdm, on_events)

    def effort_budget(self, effort: str) -> int | None:
        """The thinking budget `reasoning_effort` means (EngineConfig.reasoning_effort_budgets)."""
        budgets = self.engine.config.reasoning_effort_budgets
        if effort not in budgets:
            raise InvalidParameterError(f"unknown reasoning_effort {effort!r}; use one of {', '.join(budgets)}",
                                        param="reasoning_effort")
        return budgets[effort]

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = True,
        chat_template: str | None = None, **template_kwargs: Any,
    ) -> list[int]:
        return self.engine.inputs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template, **template_kwargs)

    # ------------------------------------------------------------------ strategies
    def solve(self, prompt: Prompt | list[dict[str, str]], strategy: str = "majority@k", *, k: int | None = None,
              m: int | None = None, budget: int | None = None, sampling_params: SamplingParams | None = None,
              extract: str = "auto", verifier=None, use_chat_template: bool | None = None, **strategy_options):
        """Answer one question with a test-time strategy; returns a `strategies.Answer`.
        `strategy_options` set the strategy's parameters by name (e.g. eta=10, tau=0.95)."""
        return self.solve_many([prompt], strategy, k=k, m=m, budget=budget, sampling_params=sampling_params,
                               extract=extract, verifier=verifier, use_chat_template=use_chat_template,
                               **strategy_options)[0]

    def solve_many(self, prompts: list, strategy: str = "majority@k", *, k: int | None = None, m: int | None = None,
                   budget: int | None = None, sampling_params: SamplingParams | None = None, extract: str = "auto",
                   verifier=None, use_chat_template: bool | None = None, **strategy_options) -> list:
        """Run a strategy on many prompts at once; all their samples share the engine's batches.

        A string prompt is sent through the chat template as a user message when the model
        has one (pass use_chat_template=False for raw completion); a list of messages
        always is; token ids never are. `verifier` is one object or one per prompt.
        """
        spec = parse_strategy(strategy, k=k, m=m, budget=budget, **strategy_options)
        params = sampling_params or SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
        verifiers = verifier if isinstance(verifier, (list, tuple)) else [verifier] * len(prompts)
        if len(verifiers) != len(prompts):
            raise InvalidParameterError("give one verifier, or one per prompt", param="verifier")
        return self.run_strategy_jobs([StrategyJob(p, spec, params, extract, v, use_chat_template)
                                       for p, v in zip(prompts, verifiers)])

    def run_strategy_jobs(self, jobs: list["StrategyJob"], *, backend_wrapper: Callable | None = None,
                          on_finished: Callable | None = None) -> list:
        """Run many (prompt, strategy, params, extractor, verifier) jobs concurrently: every
        sample of every job shares the engine's batches. Returns one `Answer` per job.
        `backend_wrapper(backend)` may return a backend that watches the sample groups (a live view);
        `on_finished(index, answer)` runs as each job completes (progress, saving results early)."""
        staged = [self._strategy_prompt(job.prompt, job.use_chat_template) for job in jobs]
        for _, ids in staged:
            self.engine.check_prompt(ids)
        async_engine = AsyncEngine(self.engine).start()
        try:
            async def main():
                backend = LocalBackend(async_engine)
                if backend_wrapper is not None:
                    backend = backend_wrapper(backend)

                async def one(index: int, job: StrategyJob, text: str, ids: list[int]):
                    answer = await run_strategy(backend, job.spec, ids, job.params, prompt_text=text,
                                                extract=job.extract, verifier=job.verifier)
                    if on_finished is not None:
                        on_finished(index, answer)
                    return answer

                return await asyncio.gather(*(one(i, job, text, ids)
                                              for i, (job, (text, ids)) in enumerate(zip(jobs, staged))))

            return asyncio.run(main())
        finally:
            async_engine.shutdown()

    def _strategy_prompt(self, prompt, use_chat_template: bool | None) -> tuple[str, list[int]]:
        """(text the strategy shows, token ids) of a strategy prompt: chat messages and (by
        default, where the model has a template) plain text go through the chat template."""
        inputs = self.engine.inputs
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return prompt[-1].get("content", ""), self.apply_chat_template(prompt)
        if isinstance(prompt, str):
            if use_chat_template if use_chat_template is not None else inputs.has_chat_template:
                return prompt, self.apply_chat_template([{"role": "user", "content": prompt}])
            return prompt, inputs.tokenize(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = inputs.prompt_ids(prompt)
            return text or "", ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return "", list(prompt)
        raise InvalidParameterError("a prompt is a string, a list of chat messages or a list of token ids",
                                    param="prompt")

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _normalize_prompts(prompts: Prompt | list[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, SequenceABC) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)

    @staticmethod
    def _normalize_params(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise InvalidParameterError(
                f"got {len(params)} sampling params for {count} prompts; give one, or one per prompt",
                param="sampling_params",
            )
        return params

    def _run(self, prompts: list[Prompt], params_list: list[SamplingParams], use_tqdm: bool,
             on_events: Callable[[list[TokenEvent]], None] | None = None) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        # Validate everything before queueing anything, so a bad prompt loses no work.
        staged = [engine.inputs.prompt_ids(prompt) for prompt in prompts]
        for text, token_ids in staged:
            engine.check_prompt(token_ids)
        for (text, token_ids), params in zip(staged, params_list):
            ids.append(engine.add_request(text, params, prompt_token_ids=token_ids).request_id)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while len(results) < len(ids):
                result = engine.step()
                if on_events is not None and result.events:
                    on_events(result.events)
                for output in result.finished:
                    results[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                if request_id not in results:
                    engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]
