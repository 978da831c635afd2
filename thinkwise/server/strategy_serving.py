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
cached prompt tokens, all decoded tokens, aborted samples included). Streaming is refused
with a 400: the answer exists only once the samples are decided. A client that
disconnects aborts every sample at once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from thinkwise.errors import InvalidParameterError
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
    """A LocalBackend that remembers its groups, so a cancelled strategy can abort them."""

    def __init__(self, engine):
        super().__init__(engine)
        self.groups = []

    async def start(self, prompt_token_ids, params):
        group = await super().start(prompt_token_ids, params)
        self.groups.append(group)
        return group

    async def abort_all(self) -> None:
        for group in self.groups:
            if not group.done:
                await self.engine.abort(group.request_id)


async def chat_with_strategy(serving, req, http: Request, spec: StrategySpec, model: str) -> Response:
    from thinkwise.server.serving import _unless_disconnected
    from thinkwise.server.streaming import dumps

    if req.stream:
        raise InvalidParameterError("stream=true is not supported with a thinkwise strategy: the answer is decided "
                                    "only when the samples are; send stream=false", param="stream")
    if req.n not in (None, 1):
        raise InvalidParameterError("n must be 1 with a thinkwise strategy (the strategy's k sets the samples)",
                                    param="n")
    samples = max(spec.k, 1)
    serving._check_n(samples)
    prompt = await serving.chat_prompt(req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = serving._max_tokens(requested, "max_tokens", [prompt], default=512)
    params = serving._sampling_params(req, n=1, max_tokens=max_tokens, logprobs=None)
    options = req.thinkwise
    verifier = None
    if options is not None and options.answer is not None:
        from thinkwise.tasks.verifiers import ExactChecker

        verifier = ExactChecker(options.answer)
    extract = options.extract if options is not None else "auto"
    serving._admit(samples)
    backend = _TrackingBackend(serving.async_engine)
    started = time.time()
    try:
        work = run_strategy(backend, spec, prompt, params, prompt_text=req.messages[-1].text(), extract=extract,
                            verifier=verifier)
        answer = await _unless_disconnected(http, work)
    finally:
        with anyio.CancelScope(shield=True):  # even when this handler is cancelled (shutdown)
            await backend.abort_all()  # a cancelled or failed strategy leaves nothing running
        serving._release(samples)
    if answer is None:  # the client went away
        serving.metrics.aborted.inc()
        return Response(status_code=499)
    cost = answer.cost
    serving.metrics.prompt_tokens.inc(cost.prompt_tokens)
    serving.metrics.prompt_tokens_cached.inc(cost.prompt_tokens_cached)
    serving.metrics.generation_tokens.inc(cost.decode_tokens)
    completion_tokens = cost.decode_tokens + cost.forced_tokens
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(started), "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": cost.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": cost.prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cost.prompt_tokens_cached}},
        "thinkwise": {"strategy": answer.strategy, "answer": answer.answer, "votes": answer.votes,
                      "samples": [asdict(s) for s in answer.samples], "cost": asdict(cost), "cost_basis": answer.cost_basis,
                      "served_model": model},
    }
    return Response(dumps(body), media_type="application/json")
