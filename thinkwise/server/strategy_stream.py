"""Live strategy streams: `stream=true` with a thinkwise strategy, as server-sent events.

Every event is an OpenAI `chat.completion.chunk` (one choice, index 0), so the official
`openai` client reads the stream unchanged; what is strategy-specific rides in a top-level
`thinkwise` object, which OpenAI clients keep as an extra field (`chunk.model_extra`):

- `{"event": "started", "strategy": {...}, "samples": K}` on the first chunk (role only);
- `{"event": "progress", "samples": [...], "votes": {...}}` whenever a sample changes state
  (finished, aborted with its reason, hit max_tokens) and, while tokens flow, at most every
  `PROGRESS_INTERVAL_S`: each sample's index, tokens, phase ("thinking" while its thinking
  block is open, else "answering"), finish_reason, abort_reason and extracted answer, and
  the running tally of finished samples' answers;
- `{"event": "decided", "answer": ..., "votes": {...}, "strategy": ...}` once the strategy
  has chosen;
- then the chosen sample's text as ordinary deltas (`reasoning_content` for its thinking,
  `content` for the answer, split by the request's reasoning parser);
- the last choice chunk has finish_reason "stop" and `{"event": "done", "cost": {...},
  "samples": [...]}` with the full cost; a `usage` chunk follows when
  `stream_options.include_usage` is set; then `data: [DONE]`.

The strategy runs as its own task on the server's engine; a client that disconnects
cancels it and aborts every sample at once (their KV blocks are freed before the next
step), as the non-streamed path does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import anyio

from thinkwise.server.streaming import DONE, dumps

logger = logging.getLogger("thinkwise.server")

PROGRESS_INTERVAL_S = 0.2  # token-count updates at most this often; state changes go out at once
TEXT_PIECE_CHARS = 256  # the chosen text is sent in pieces of this size


class LiveTally:
    """The samples of every group a strategy started, as the stream reports them."""

    def __init__(self, extract: Callable[[str], str | None], parser=None, prompt_tail: str = ""):
        self.extract = extract
        self.parser, self.prompt_tail = parser, prompt_tail  # for each sample's phase (thinking or answering)
        self.groups: list = []
        self._answers: dict[tuple[int, int], str | None] = {}

    def samples(self) -> list[dict[str, Any]]:
        rows, label = [], 0
        for g, group in enumerate(self.groups):
            for i in range(group.k):
                reason = group.finish_reasons[i]
                answer = None
                if reason == "stop":
                    if (g, i) not in self._answers:
                        self._answers[(g, i)] = self.extract(group.texts[i])
                    answer = self._answers[(g, i)]
                phase = "answering"
                if self.parser is not None and self.parser.name != "none":
                    reasoning, _, closed = self.parser.split(group.texts[i], self.prompt_tail)
                    phase = "thinking" if reasoning is not None and not closed else "answering"
                rows.append({"index": label, "tokens": group.num_tokens[i], "phase": phase,
                             "finished": reason is not None,
                             "finish_reason": reason, "aborted": group.abort_reasons[i] is not None or reason == "abort",
                             "abort_reason": group.abort_reasons[i], "answer": answer})
                label += 1
        return rows

    @staticmethod
    def votes(rows: list[dict[str, Any]]) -> dict[str, int]:
        tally: dict[str, int] = {}
        for row in rows:
            if row["answer"] is not None:
                tally[row["answer"]] = tally.get(row["answer"], 0) + 1
        return tally


async def strategy_chunks(*, serving, req, spec, task: asyncio.Future, backend, tally: LiveTally, wake: asyncio.Event,
                          parser, prompt_tail: str, usage_of_answer, body_extra, release) -> AsyncIterator[bytes]:
    """The SSE body of a streamed strategy request (see the module doc); `task` runs the strategy."""
    response_id = f"chatcmpl-{_hex()}"
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "system_fingerprint": None}

    def chunk(delta: dict[str, Any], thinkwise: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
        body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        if thinkwise is not None:
            body["thinkwise"] = thinkwise
        return f"data: {dumps(body)}\n\n".encode()

    try:
        yield chunk({"role": "assistant", "content": ""},
                    {"event": "started", "strategy": asdict(spec), "samples": max(spec.k, 1)})
        last_state, last_tokens, last_sent = None, None, 0.0
        while not task.done():
            waiter = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            wake.clear()
            rows = tally.samples()
            state = [(r["finish_reason"], r["abort_reason"], r["answer"], r["phase"]) for r in rows]
            tokens = [r["tokens"] for r in rows]
            now = time.monotonic()
            if state != last_state or (tokens != last_tokens and now - last_sent >= PROGRESS_INTERVAL_S):
                yield chunk({}, {"event": "progress", "samples": rows, "votes": tally.votes(rows)})
                last_state, last_tokens, last_sent = state, tokens, now
        answer = task.result()
        rows = tally.samples()
        yield chunk({}, {"event": "progress", "samples": rows, "votes": tally.votes(rows)})
        yield chunk({}, {"event": "decided", "strategy": answer.strategy, "answer": answer.answer,
                         "votes": answer.votes})
        reasoning, content, _ = parser.split(answer.text, prompt_tail)
        for key, text in (("reasoning_content", reasoning or ""), ("content", content)):
            for start in range(0, len(text), TEXT_PIECE_CHARS):
                yield chunk({key: text[start:start + TEXT_PIECE_CHARS]})
        yield chunk({}, {"event": "done", **body_extra(answer)}, finish="stop")
        if include_usage:
            body = {**head, "choices": [], "usage": usage_of_answer(answer)}
            yield f"data: {dumps(body)}\n\n".encode()
        yield DONE
    except Exception as error:  # the status line is sent: report in the stream, keep the server up
        logger.exception("strategy stream %s failed", response_id)
        message = error.message if hasattr(error, "message") else f"the strategy failed: {type(error).__name__}"
        body = {"error": {"message": f"{message} (request {response_id})", "type": "internal_server_error"
                          if not hasattr(error, "param") else "invalid_request_error",
                          "param": getattr(error, "param", None), "code": None}}
        yield f"data: {dumps(body)}\n\n".encode()
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                serving.metrics.aborted.inc()
            await backend.abort_all()  # whatever the strategy left running stops now
            release()


def _hex() -> str:
    import uuid

    return uuid.uuid4().hex
