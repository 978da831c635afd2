"""Test-time strategies through the chat completions endpoint.

A request asks for a strategy in one of two ways: a top-level `thinkwise` object
(`extra_body={"thinkwise": {"strategy": "short-m@k", "k": 8, "m": 3}}` with the openai
client; any parameter of the strategy registry is a field too, e.g. `"eta": 10`), or a
model-name prefix — `short-m@k-8-3/default`, `short-3@8/default`, `majority@8/<model>`,
`adaptive:16/<model>`, `deepconf@16(eta=10)/<model>`, `best-of-4/<model>` (best-of-n and
first-pass@k need `thinkwise.answer`, the reference for an exact checker). Both may be
given when the object adds options (extract, answer) to a prefix's strategy; two
different strategies are a 400. The strategy runs on the server's engine, batched with
every other request (max_tokens defaults to 512 per sample); the response is an
ordinary chat completion whose message is the chosen sample's text, plus a `thinkwise`
object with the extracted answer, the votes, every sample's outcome and the cost, and a
`usage` that counts every token the strategy computed (prompt once per engine request,
cached prompt tokens, all decoded tokens, aborted samples included; reasoning_tokens are
the thinking tokens). The message splits the chosen text into `reasoning_content` and
`content` by the request's reasoning parser. With `stream=true` the samples' progress,
the vote tally, the decision and then the chosen text stream as chat chunks
(`strategy_stream.py`). A client that disconnects aborts every sample at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from thinkwise.errors import InvalidParameterError
from thinkwise.server.disconnect import unless_disconnected
from thinkwise.server.streaming import dumps
from thinkwise.strategies import (
    LocalBackend, StrategySpec, model_prefix_strategy, option_params, parse_strategy, run_strategy,
)


def _option_values(options) -> dict[str, Any]:
    """The strategy parameters given as fields of the thinkwise object beyond its declared ones
    (round_size, threshold, eta, tau, ...): JSON numbers (a choice's name for text options)."""
    extras = dict((options.model_extra or {}) if options is not None else {})
    kinds = {p.name: p.kind for p in option_params()}
    for name, value in extras.items():
        kind = kinds.get(name)
        if kind is None:
            raise InvalidParameterError(f"thinkwise.{name} is not a strategy parameter (known: k, m, budget, "
                                        f"{', '.join(kinds)})", param=f"thinkwise.{name}")
        if (kind is str) != isinstance(value, str) or isinstance(value, bool) or \
                not isinstance(value, (str, int, float)):
            raise InvalidParameterError(f"thinkwise.{name} must be {'a string' if kind is str else 'a number'}",
                                        param=f"thinkwise.{name}")
    return extras


def _field_error(error: InvalidParameterError) -> InvalidParameterError:
    """A registry error re-addressed to the request field it came from (thinkwise.eta, ...)."""
    param = error.param if error.param and error.param not in ("strategy", None) else "strategy"
    return InvalidParameterError(error.message if error.message.startswith("thinkwise.") else
                                 f"thinkwise.{param}: {error.message}", param=f"thinkwise.{param}")


def _prefix_strategy(serving, model: str) -> tuple[StrategySpec, str] | None:
    """The strategy named by a model-name prefix (`majority@8/<model>`), if there is one."""
    if "/" not in model or model in serving.settings.served_model_names:
        return None  # served model names may contain '/' themselves
    prefix, rest = model.split("/", 1)
    try:
        spec = model_prefix_strategy(prefix)
    except InvalidParameterError:
        return None  # not a strategy: an ordinary (unknown) model name, reported as such later
    except ValueError as error:  # e.g. a number past Python's int-conversion limit of 4,300 digits
        raise InvalidParameterError(f"model names a strategy {prefix[:60]!r}... whose number cannot be read "
                                    f"({str(error)[:120]}); use a small number such as majority@8/<model>",
                                    param="model") from None
    serving.check_model(rest)
    return spec, rest


def requested_strategy(serving, req) -> tuple[StrategySpec, str] | None:
    """(strategy, served model name) if the request asks for a strategy, else None."""
    options = req.thinkwise
    extras = _option_values(options)
    prefixed = _prefix_strategy(serving, req.model)
    declared = {"k": options.k, "m": options.m, "budget": options.budget} if options is not None else {}
    if prefixed is not None and (extras or any(v is not None for v in declared.values())):
        # The object's fields set the prefix's strategy's options (as they do a thinkwise.strategy's).
        try:
            prefixed = model_prefix_strategy(req.model.split("/", 1)[0], **declared, **extras), prefixed[1]
        except InvalidParameterError as error:
            raise _field_error(error) from None
    if options is None or options.strategy is None:
        if prefixed is None and options is not None:
            raise InvalidParameterError("the thinkwise object needs a strategy (e.g. \"majority@8\"), or name one "
                                        "in the model (e.g. \"majority@8/<model>\")", param="thinkwise.strategy")
        return prefixed
    try:
        spec = parse_strategy(options.strategy, k=options.k, m=options.m, budget=options.budget, **extras)
    except InvalidParameterError as error:
        raise _field_error(error) from None
    except ValueError as error:  # e.g. a number past Python's int-conversion limit of 4,300 digits
        raise InvalidParameterError(f"thinkwise.strategy cannot be read: {str(error)[:160]}",
                                    param="thinkwise.strategy") from None
    if prefixed is not None:
        if prefixed[0] != spec:
            raise InvalidParameterError(f"the model name asks for one strategy and thinkwise.strategy for another "
                                        f"({options.strategy!r}); name it once", param="thinkwise.strategy")
        return prefixed
    serving.check_model(req.model)
    return spec, req.model


class _TrackingBackend(LocalBackend):
    """A LocalBackend that remembers its groups, so a cancelled strategy can abort them;
    `on_change()` (if given) runs after every step's events of every group (live streams)."""

    def __init__(self, engine, on_change: Callable[[], None] | None = None, groups: list | None = None):
        super().__init__(engine)
        self.groups = [] if groups is None else groups
        self.on_change = on_change

    async def start(self, prompt_token_ids, params):
        group = await super().start(prompt_token_ids, params)
        self.groups.append(group)
        if self.on_change is not None:
            next_events, on_change = group.next_events, self.on_change

            async def watched_next_events():
                changes = await next_events()
                on_change()
                return changes

            group.next_events = watched_next_events  # wait() calls it too, so every step is seen
            on_change()
        return group

    async def abort_all(self) -> None:
        for group in self.groups:
            if not group.done:
                await self.engine.abort(group.request_id)


async def chat_with_strategy(serving, req, http: Request, spec: StrategySpec, model: str) -> Response:
    if req.n not in (None, 1):
        raise InvalidParameterError("n must be 1 with a thinkwise strategy (the strategy's k sets the samples)",
                                    param="n")
    samples = max(spec.k, 1)
    serving.check_n(samples)
    prompt = await serving.chat_prompt(req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = serving.max_tokens_for(requested, "max_tokens", [prompt], default=512)
    params = serving.sampling_params_for(req, n=1, max_tokens=max_tokens, logprobs=None)
    options = req.thinkwise
    verifier = None
    if options is not None and options.answer is not None:
        from thinkwise.tasks.verifiers import ExactChecker

        verifier = ExactChecker(options.answer)
    extract = options.extract if options is not None else "auto"
    parser, prompt_tail = serving.reasoning_parser(req), serving.prompt_tail(prompt)

    def usage(answer) -> dict[str, Any]:
        cost = answer.cost
        completion_tokens = cost.decode_tokens + cost.forced_tokens
        return {"prompt_tokens": cost.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": cost.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cost.prompt_tokens_cached},
                "completion_tokens_details": {"reasoning_tokens": cost.thinking_tokens}}

    def extra(answer) -> dict[str, Any]:
        return {"strategy": answer.strategy, "answer": answer.answer, "votes": answer.votes,
                "samples": [asdict(s) for s in answer.samples], "cost": asdict(answer.cost),
                "cost_basis": answer.cost_basis, "served_model": model}

    def count(answer) -> None:
        cost = answer.cost
        serving.metrics.prompt_tokens.inc(cost.prompt_tokens)
        serving.metrics.prompt_tokens_cached.inc(cost.prompt_tokens_cached)
        serving.metrics.generation_tokens.inc(cost.decode_tokens)

    serving.admit(samples)
    if req.stream:
        from starlette.responses import StreamingResponse

        from thinkwise.server.strategy_stream import LiveTally, strategy_chunks
        from thinkwise.tasks.extraction import extract_answer

        wake = asyncio.Event()
        tally = LiveTally(partial(extract_answer, method=extract), parser, prompt_tail)
        backend = _TrackingBackend(serving.async_engine, on_change=wake.set, groups=tally.groups)

        async def work():
            answer = await run_strategy(backend, spec, prompt, params, prompt_text=req.messages[-1].text(),
                                        extract=extract, verifier=verifier)
            count(answer)
            return answer

        # Start now and wait for the first sample group (or a failure): a strategy that refuses
        # its input fails before any group starts, and that is still a 400, not an event in a 200 stream.
        task = asyncio.ensure_future(work())
        started_waiter = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({task, started_waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
                await backend.abort_all()
            serving.release(samples)
            raise
        finally:
            started_waiter.cancel()
        if task.done() and task.exception() is not None:
            with anyio.CancelScope(shield=True):
                await backend.abort_all()
            serving.release(samples)
            raise task.exception()
        body = strategy_chunks(serving=serving, req=req, spec=spec, task=task, backend=backend, tally=tally,
                               wake=wake, parser=parser, prompt_tail=prompt_tail, usage_of_answer=usage,
                               body_extra=extra, release=lambda: serving.release(samples))
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    backend = _TrackingBackend(serving.async_engine)
    started = time.time()
    try:
        work = run_strategy(backend, spec, prompt, params, prompt_text=req.messages[-1].text(), extract=extract,
                            verifier=verifier)
        answer = await unless_disconnected(http, work)
    finally:
        with anyio.CancelScope(shield=True):  # even when this handler is cancelled (shutdown)
            await backend.abort_all()  # a cancelled or failed strategy leaves nothing running
        serving.release(samples)
    if answer is None:  # the client went away
        serving.metrics.aborted.inc()
        return Response(status_code=499)
    count(answer)
    reasoning, content, _ = parser.split(answer.text, prompt_tail)
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(started), "model": req.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(answer),
        "thinkwise": extra(answer),
    }
    return Response(dumps(body), media_type="application/json")
