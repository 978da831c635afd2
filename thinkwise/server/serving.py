"""From a validated OpenAI request to engine requests and back to an OpenAI response.

`OpenAIServing` checks what the schema cannot (the model name, limits that depend on
the prompt and the server's settings, OpenAI features thinkwise does not implement),
renders the chat template or tokenizes the prompt(s) on its own worker thread (never on
the event loop, so /health and streams stay responsive while a huge prompt is processed;
a prompt that cannot fit the context by its size alone is refused before tokenizing), maps the request to `SamplingParams` with OpenAI's defaults (temperature 1,
completions max_tokens 16, chat: up to the context), admits it against the queue
limit (429 beyond it), and hands it to the `AsyncEngine`. `EngineRun` holds the engine
requests of one HTTP request (one per prompt) so they are read and aborted together.
Usage is the engine's own accounting: a prompt is counted once however many samples
share it, and cached_tokens is what the prefix cache served.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from thinkwise.engine.async_engine import AsyncEngine, EngineDeadError, StreamItem
from thinkwise.engine.outputs import RequestOutput
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError, ModelNotFoundError, PromptTooLongError
from thinkwise.server.disconnect import unless_disconnected
from thinkwise.server.errors import QueueFullError
from thinkwise.server.strategy_serving import chat_with_strategy, requested_strategy
from thinkwise.server.metrics import ServerMetrics
from thinkwise.server.protocol import ChatCompletionRequest, CompletionRequest
from thinkwise.server.reasoning import prompt_opens_thinking, split_reasoning
from thinkwise.server.streaming import chat_stream, completion_stream, dumps

logger = logging.getLogger("thinkwise.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_n: int = 16  # most samples per prompt
    max_queue: int = 1024  # sequences that may wait beyond the engine's batch before requests get 429
    max_body_bytes: int = 8 << 20
    open_docs: bool = False  # with an api_key: serve /docs, /redoc, /openapi.json without it
    timeout_keep_alive: float = 5.0  # idle keep-alive connections are closed after this
    timeout_request_read: float = 30.0  # a request's headers, then its body, must arrive within this
    created: int = field(default_factory=lambda: int(time.time()))


class EngineRun:
    """The engine requests behind one HTTP request: added, read and aborted together."""

    def __init__(self, async_engine: AsyncEngine, metrics: ServerMetrics, request_id: str, arrival: float):
        self.async_engine = async_engine
        self.metrics = metrics
        self.request_id = request_id
        self.arrival = arrival
        self.prompts: list[list[int]] = []
        self.engine_ids: list[str] = []
        self.queues: list[asyncio.Queue] = []
        self.finals: list[RequestOutput | None] = []
        self._pumps: list[asyncio.Task] = []
        self._last_token: float | None = None
        self._closed = False

    async def start(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Add every prompt's request; all of them land between the same two engine steps."""
        ids = [self.request_id if len(prompts) == 1 else f"{self.request_id}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(*(
            self.async_engine.add_request(None, params, prompt_token_ids=prompt, request_id=engine_id)
            for prompt, engine_id in zip(prompts, ids)
        ), return_exceptions=True)
        for prompt, engine_id, result in zip(prompts, ids, results):
            if not isinstance(result, BaseException):
                self.prompts.append(prompt)
                self.engine_ids.append(engine_id)
                self.queues.append(result[1])
                self.finals.append(None)
                self.metrics.prompt_tokens.inc(len(prompt))
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            self._closed = True
            with anyio.CancelScope(shield=True):
                for engine_id in self.engine_ids:
                    await self.async_engine.abort(engine_id)
            raise failed

    async def items(self) -> AsyncIterator[list[tuple[int, StreamItem]]]:
        """Batches of (prompt index, item), until every request has its final output.

        A batch holds everything that arrived since the last one: when the consumer falls
        behind the engine, several steps go out in one write instead of one write per step.
        """
        if len(self.queues) == 1:
            source = self.queues[0]
            tag = 0
        else:
            source = asyncio.Queue()
            tag = None

            async def pump(index: int, queue: asyncio.Queue) -> None:
                while True:
                    item = await queue.get()
                    source.put_nowait((index, item))
                    if isinstance(item, BaseException) or item.final is not None:
                        return

            self._pumps = [asyncio.ensure_future(pump(i, q)) for i, q in enumerate(self.queues)]
        remaining = sum(1 for f in self.finals if f is None)
        while remaining:
            entries = [await source.get()]
            while not source.empty():
                entries.append(source.get_nowait())
            batch = []
            for entry in entries:
                index, item = (tag, entry) if tag is not None else entry
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed while running request {self.request_id}") from item
                self._observe(item)
                if item.final is not None:
                    self.finals[index] = item.final
                    remaining -= 1
                batch.append((index, item))
            yield batch

    def _observe(self, item: StreamItem) -> None:
        metrics = self.metrics
        if item.events:
            now = time.monotonic()
            if self._last_token is None:
                metrics.ttft.observe(now - self.arrival)
            else:
                metrics.itl.observe(now - self._last_token)
            self._last_token = now
            tokens = 0
            for event in item.events:
                tokens += len(event.token_ids)
                if event.finish_reason is not None:
                    metrics.finished_sequences.labels(event.finish_reason).inc()
            metrics.generation_tokens.inc(tokens)
        if item.final is not None:
            metrics.prompt_tokens_cached.inc(min(item.final.counts.prompt_tokens_cached, item.final.counts.prompt_tokens))

    async def close(self) -> None:
        """Abort whatever has not finished (a client that left); frees its KV blocks before the next step."""
        if self._closed:
            return
        self._closed = True
        for task in self._pumps:
            task.cancel()
        unfinished = [rid for rid, final in zip(self.engine_ids, self.finals) if final is None]
        if unfinished:
            if self.async_engine.is_running:  # else the engine died, which is not the client's doing
                self.metrics.aborted.inc()
            for rid in unfinished:
                try:
                    await self.async_engine.abort(rid)
                except EngineDeadError:
                    pass
        self.metrics.e2e.observe(time.monotonic() - self.arrival)


@dataclass
class ResponseContext:
    """What the response writers need besides the engine outputs."""

    serving: "OpenAIServing"
    request_id: str
    response_id: str
    model: str
    created: int
    n: int
    stops: list[str]
    logprobs: int | None
    include_usage: bool = False
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    thinking_open: bool = False  # the chat template opened a <think> block: output starts as reasoning

    def usage(self, finals: list[RequestOutput | None]) -> dict[str, Any]:
        return usage_of([f for f in finals if f is not None])

    def chat_logprobs(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        token, raw = self.serving.token_text, self.serving.token_bytes
        return [
            {"token": token(e["token_id"]), "logprob": _finite(e["logprob"]), "bytes": raw(e["token_id"]),
             "top_logprobs": [{"token": token(t), "logprob": _finite(lp), "bytes": raw(t)}
                              for t, lp in (e.get("top") or [])[: self.logprobs]]}
            for e in entries
        ]

    def completion_logprobs(self, entries: list[dict[str, Any]], offset: int) -> tuple[dict[str, Any], int]:
        token = self.serving.token_text
        tokens, values, tops, offsets = [], [], [], []
        for e in entries:
            text = token(e["token_id"])
            tokens.append(text)
            values.append(_finite(e["logprob"]))
            top = {token(t): _finite(lp) for t, lp in (e.get("top") or [])[: self.logprobs]}
            top.setdefault(text, _finite(e["logprob"]))  # OpenAI lists the sampled token too
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def usage_of(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(f.counts.prompt_tokens for f in finals)
    completion = sum(f.counts.generated_tokens + f.counts.forced_tokens for f in finals)
    cached = sum(min(f.counts.prompt_tokens_cached, f.counts.prompt_tokens) for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finite(value: float) -> float:
    return value if value == value and value > _LOGPROB_FLOOR else _LOGPROB_FLOOR


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the characters byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _raw_token_bytes(tokenizer: Any, token_id: int) -> list[int] | None:
    """Bytes of a byte-level BPE or SentencePiece byte-fallback token; None when the vocabulary says nothing."""
    if tokenizer is None:
        return None
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # an id the tokenizer does not know (a model whose vocab is larger than its tokenizer's)
        return None
    if not isinstance(piece, str):
        return None
    match = _HEX_BYTE.match(piece)
    if match:
        return [int(match.group(1), 16)]
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel" and piece and all(ch in _BYTE_DECODER for ch in piece):
        return [_BYTE_DECODER[ch] for ch in piece]
    return None


class OpenAIServing:
    def __init__(self, llm, async_engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics):
        self.llm = llm
        self.engine = async_engine.engine
        self.async_engine = async_engine
        self.settings = settings
        self.metrics = metrics
        self.capacity = self.engine.config.max_num_seqs + settings.max_queue
        self.max_n = min(settings.max_n, self.engine.config.max_num_seqs)
        self.requests_in_flight = 0
        self.sequences_in_flight = 0
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        # One worker: tokenizers are not safe to share between threads, and one thread
        # keeps every template render and tokenization off the event loop.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thinkwise-prepare")
        self._longest_token_bytes: int | None = None

    async def _prepare(self, function, *args):
        """Run template rendering / tokenization on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, function, *args)

    def _check_text(self, text: str, param: str, total_bytes: list[int]) -> None:
        """Refuse text that cannot be tokenized (lone surrogates) or that cannot fit the
        context whatever it tokenizes to: every token covers at most the vocabulary's
        longest token in bytes, so more bytes than max_model_len times that is too long."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise InvalidParameterError(
                f"{param} is not valid Unicode text: {error.reason} at position {error.start} (a lone surrogate "
                "such as \\ud800 in JSON); send UTF-8 text", param=param) from None
        total_bytes[0] += size
        limit = self.engine.max_model_len * self._token_bytes_bound()
        if total_bytes[0] > limit:
            raise PromptTooLongError(
                f"{param} has {total_bytes[0]} bytes of text, more than this model's context of "
                f"{self.engine.max_model_len} tokens can hold (at most {self._token_bytes_bound()} bytes a token); "
                "shorten it", param=param)

    def _token_bytes_bound(self) -> int:
        if self._longest_token_bytes is None:
            tokenizer = self.engine.tokenizer
            longest = 0
            try:
                vocab = tokenizer.get_vocab() if tokenizer is not None else {}
                longest = max((len(piece.encode("utf-8", "replace")) for piece in vocab), default=0)
            except Exception:  # a tokenizer without a vocabulary listing: no early refusal
                longest = 0
            self._longest_token_bytes = max(longest, 1) if longest else 1 << 30
        return self._longest_token_bytes

    # ------------------------------------------------------------------ helpers
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            tokenizer = self.engine.tokenizer
            text = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else f"<{token_id}>"
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: a lone piece of a multi-byte character decodes to U+FFFD, its bytes do not."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = _raw_token_bytes(self.engine.tokenizer, token_id)
            if raw is None:
                raw = list(self.token_text(token_id).encode("utf-8"))
            self._token_bytes[token_id] = raw
        return raw

    def check_model(self, name: str) -> None:
        if name not in self.settings.served_model_names:
            served = ", ".join(repr(n) for n in self.settings.served_model_names)
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {served} "
                                     "(see GET /v1/models)", param="model")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise InvalidParameterError(f"n is {n} but this server allows at most {self.max_n} samples per prompt "
                                        "(its --max-n / --max-num-seqs)", param="n")

    def max_tokens_for(self, requested: int | None, param: str, prompts: list[list[int]], default: int | None) -> int | None:
        longest = max(len(p) for p in prompts)
        for ids in prompts:
            self.engine.check_prompt(ids)  # prompt too long for the context or the KV cache: the engine's message
        room = self.engine.max_model_len - longest
        if requested is None:
            return None if default is None else min(default, room)
        if requested > room:
            raise PromptTooLongError(
                f"this model's context holds {self.engine.max_model_len} tokens, but the prompt has {longest} and "
                f"{param} asks for {requested} more; set {param} to at most {room} or shorten the prompt",
                param=param,
            )
        return requested

    def sampling_params_for(self, req, *, n: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=n, max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0, min_p=float(req.min_p or 0.0), seed=req.seed, stop=_stops(req.stop),
            ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0, logprobs=logprobs,
        )

    def admit(self, sequences: int) -> None:
        if self.sequences_in_flight and self.sequences_in_flight + sequences > self.capacity:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFullError(
                f"the server is at capacity ({self.sequences_in_flight} sequences running or queued, limit "
                f"{self.capacity}); retry shortly")
        self.sequences_in_flight += sequences
        self.requests_in_flight += 1
        self.metrics.requests_in_flight.inc()

    def release(self, sequences: int) -> None:
        self.sequences_in_flight -= sequences
        self.requests_in_flight -= 1
        self.metrics.requests_in_flight.dec()

    async def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        conversation = []
        total = [0]
        for index, message in enumerate(req.messages):
            entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                     "content": message.text()}
            self._check_text(entry["content"], f"messages[{index}].content", total)
            if message.name is not None:
                self._check_text(message.name, f"messages[{index}].name", total)
                entry["name"] = message.name
            conversation.append(entry)
        return await self._prepare(self._render_chat, conversation)

    def _render_chat(self, conversation: list[dict[str, Any]]) -> list[int]:
        try:
            return self.llm.apply_chat_template(conversation)
        except InvalidParameterError:
            raise
        except Exception as error:  # the model's template refused these messages (jinja raise, wrong roles)
            import jinja2

            if isinstance(error, (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError)):
                raise InvalidParameterError(f"the model's chat template cannot render these messages: {error}",
                                            param="messages") from error
            raise

    async def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif all(isinstance(p, int) for p in prompt):
            return [list(prompt)], [await self._prepare(self._decode, prompt)] if req.echo else [""]
        else:
            return [list(p) for p in prompt], [await self._prepare(self._decode, p) if req.echo else "" for p in prompt]
        for index, text in enumerate(texts):
            self._check_text(text, "prompt" if isinstance(prompt, str) else f"prompt[{index}]", [0])
        return await self._prepare(lambda: [self.engine.tokenize(t) for t in texts]), texts

    def _decode(self, ids: list[int]) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return ""
        vocab = self.engine.model_config.vocab_size
        return tokenizer.decode([t for t in ids if t < vocab])

    # ------------------------------------------------------------------ endpoints
    async def chat(self, req: ChatCompletionRequest, http: Request) -> Response:
        arrival = time.monotonic()
        strategy = requested_strategy(self, req)
        if strategy is not None:
            return await chat_with_strategy(self, req, http, *strategy)
        self.check_model(req.model)
        n = req.n or 1
        self.check_n(n)
        prompt = await self.chat_prompt(req)
        if req.max_completion_tokens is not None:
            requested, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = req.max_tokens, "max_tokens"
        max_tokens = self.max_tokens_for(requested, param, [prompt], default=None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params_for(req, n=n, max_tokens=max_tokens, logprobs=logprobs)
        request_id = uuid.uuid4().hex
        ctx = ResponseContext(self, request_id, f"chatcmpl-{request_id}", req.model, int(time.time()), n,
                              params.stop, logprobs,
                              include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
                              thinking_open=prompt_opens_thinking(self._decode(prompt[-8:])))
        return await self._run(http, [prompt], params, ctx, n, bool(req.stream), chat_stream, self._chat_body, arrival)

    async def completions(self, req: CompletionRequest, http: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        n = req.n or 1
        self.check_n(n)
        if req.echo and req.logprobs is not None:
            raise InvalidParameterError("echo with logprobs would need prompt logprobs, which thinkwise does not "
                                        "compute; drop one of them", param="echo")
        prompts, texts = await self.completion_prompts(req)
        max_tokens = self.max_tokens_for(req.max_tokens, "max_tokens", prompts, default=COMPLETIONS_DEFAULT_MAX_TOKENS)
        params = self.sampling_params_for(req, n=n, max_tokens=max_tokens, logprobs=req.logprobs)
        request_id = uuid.uuid4().hex
        ctx = ResponseContext(self, request_id, f"cmpl-{request_id}", req.model, int(time.time()), n, params.stop,
                              req.logprobs,
                              include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
                              echo=bool(req.echo), prompt_texts=texts)
        return await self._run(http, prompts, params, ctx, n, bool(req.stream), completion_stream,
                               self._completion_body, arrival)

    async def _run(self, http: Request, prompts, params, ctx, n, stream, stream_writer, body_writer, arrival) -> Response:
        sequences = n * len(prompts)
        self.admit(sequences)
        run = EngineRun(self.async_engine, self.metrics, ctx.request_id, arrival)
        try:
            await run.start(prompts, params)
        except BaseException:
            self.release(sequences)
            raise
        if stream:
            async def body():
                try:
                    async for chunk in stream_writer(run, ctx):
                        yield chunk
                finally:
                    self.release(sequences)

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        try:
            finished = await unless_disconnected(http, _collect(run))
        finally:
            self.release(sequences)
        if finished is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return Response(dumps(body_writer(ctx, run.finals)), media_type="application/json")

    # ------------------------------------------------------------------ response bodies
    def _chat_body(self, ctx: ResponseContext, finals: list[RequestOutput]) -> dict[str, Any]:
        final = finals[0]
        choices = []
        for o in final.outputs:
            reasoning, content = split_reasoning(o.text, ctx.thinking_open)
            message = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choices.append({
                "index": o.index, "message": message,
                "logprobs": {"content": ctx.chat_logprobs(o.logprobs or [])} if ctx.logprobs is not None else None,
                "finish_reason": o.finish_reason})
        return {"id": ctx.response_id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": usage_of(finals), "system_fingerprint": None}

    def _completion_body(self, ctx: ResponseContext, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, final in enumerate(finals):
            prefix = ctx.prompt_texts[p] if ctx.echo else ""
            for o in final.outputs:
                logprobs = None
                if ctx.logprobs is not None:
                    logprobs, _ = ctx.completion_logprobs(o.logprobs or [], len(prefix))
                choices.append({"index": p * ctx.n + o.index, "text": prefix + o.text, "logprobs": logprobs,
                                "finish_reason": o.finish_reason})
        return {"id": ctx.response_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": usage_of(finals), "system_fingerprint": None}


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


async def _collect(run: EngineRun) -> bool:
    try:
        async for _ in run.items():
            pass
        return True
    finally:
        with anyio.CancelScope(shield=True):
            await run.close()
