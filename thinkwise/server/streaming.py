"""Server-sent events for streamed chat and text completions.

The engine reports, per step, the text each sample gained. A stop string can end in
a later token than it starts in, and the engine then cuts it off text it already
reported, so sending event text straight through could leak the start of a stop string
the final answer does not contain. `TextStreamer` therefore holds back the last
`len(longest stop) - 1` characters of each sample until it is known they stay; when a
sample ends it sends exactly what remains of its final text (taken from the request's
final output whenever a stop string may have cut it), so the streamed deltas always
concatenate to the same text a non-streamed request returns.

The SSE generators close the engine requests in a shielded `finally`: a client that
disconnects cancels the response task, and the abort must still reach the engine so
the samples' KV blocks are freed at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from thinkwise.engine.async_engine import StreamItem

logger = logging.getLogger("thinkwise.server")

DONE = b"data: [DONE]\n\n"


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Delta:
    """What one choice gained: text that is safe to send, its tokens' logprobs, and maybe its end."""

    index: int  # the sample's index within its request
    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _ChoiceText:
    received: str = ""  # everything the engine reported so far
    sent: int = 0  # characters of it already sent
    finished: bool = False


class TextStreamer:
    """Turns one engine request's stream items into deltas (see the module doc)."""

    def __init__(self, n: int, stops: list[str]):
        self.choices = [_ChoiceText() for _ in range(n)]
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def deltas(self, item: StreamItem) -> list[Delta]:
        out: list[Delta] = []
        final = {o.index: o for o in item.final.outputs} if item.final is not None else {}
        for event in item.events:
            choice = self.choices[event.sample_index]
            if choice.finished:
                continue
            choice.received += event.text
            if event.finish_reason is not None:
                output = final.get(event.sample_index)
                if output is not None:
                    text = output.text
                elif event.final_text is not None:  # the engine's settled text for this sample
                    text = event.final_text
                elif not self.stops:
                    text = choice.received
                else:  # a stop string may have cut text already reported: settle it on the final output
                    if event.logprobs:
                        out.append(Delta(event.sample_index, "", event.logprobs))
                    continue
                out.append(Delta(event.sample_index, text[choice.sent:], event.logprobs, event.finish_reason))
                choice.sent, choice.finished = len(text), True
                continue
            safe = len(choice.received) - self.holdback
            if safe > choice.sent:
                out.append(Delta(event.sample_index, choice.received[choice.sent:safe], event.logprobs))
                choice.sent = safe
            elif event.logprobs:
                out.append(Delta(event.sample_index, "", event.logprobs))
        for index, output in final.items():
            choice = self.choices[index]
            if not choice.finished:
                out.append(Delta(index, output.text[choice.sent:], [], output.finish_reason or "abort"))
                choice.sent, choice.finished = len(output.text), True
        return out


def _error_event(message: str, request_id: str) -> bytes:
    body = {"error": {"message": f"{message} (request id {request_id})", "type": "internal_server_error",
                      "param": None, "code": "internal_error"}}
    return f"data: {dumps(body)}\n\n".encode()


async def chat_stream(run, ctx) -> AsyncIterator[bytes]:
    """SSE for /v1/chat/completions: a role chunk per choice, content deltas, finish, usage, [DONE]."""
    usage_field = ',"usage":null' if ctx.include_usage else ""
    head = ('{"id":' + dumps(ctx.response_id) + ',"object":"chat.completion.chunk","created":' + str(ctx.created)
            + ',"model":' + dumps(ctx.model) + ',"system_fingerprint":null,"choices":[')
    tail = "]" + usage_field + "}\n\n"
    streamers = [TextStreamer(ctx.n, ctx.stops) for _ in run.prompts]
    # thinking -> reasoning_content, by the request's reasoning parser (None: all content)
    splitters = [ctx.reasoning.splitter(ctx.prompt_tail) if ctx.reasoning is not None else None
                 for _ in range(ctx.n)]
    try:
        opening = "".join(
            "data: " + head + dumps({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}) + tail
            for i in range(ctx.n)
        )
        yield opening.encode()
        async for batch in run.items():
            parts = []
            for prompt_index, item in batch:
                for delta in streamers[prompt_index].deltas(item):
                    splitter = splitters[delta.index]
                    reasoning, text = splitter.feed(delta.text) if splitter is not None else ("", delta.text)
                    if delta.finish_reason is not None and splitter is not None:
                        held_reasoning, held_text = splitter.flush()
                        reasoning, text = reasoning + held_reasoning, text + held_text
                    if not text and not reasoning and not delta.logprobs and delta.finish_reason is None:
                        continue
                    message = {"reasoning_content": reasoning} if reasoning else {}
                    if text or (delta.finish_reason is None and not reasoning):
                        message["content"] = text
                    choice = {
                        "index": delta.index,
                        "delta": message,
                        "logprobs": ({"content": ctx.chat_logprobs(delta.logprobs)} if ctx.logprobs is not None
                                     else None),
                        "finish_reason": delta.finish_reason,
                    }
                    parts.append("data: " + head + dumps(choice) + tail)
            if parts:
                yield "".join(parts).encode()
        if ctx.include_usage:
            usage = ctx.usage(run.finals)
            yield ("data: " + head + "]," + '"usage":' + dumps(usage) + "}\n\n").encode()
        yield DONE
    except Exception as error:  # an engine failure mid-stream: the status line is already sent
        logger.exception("stream %s failed", ctx.request_id)
        yield _error_event(f"the engine failed while streaming: {type(error).__name__}", ctx.request_id)
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await run.close()


async def completion_stream(run, ctx) -> AsyncIterator[bytes]:
    """SSE for /v1/completions: text deltas per choice (index = prompt * n + sample), usage, [DONE]."""
    usage_field = ',"usage":null' if ctx.include_usage else ""
    head = ('{"id":' + dumps(ctx.response_id) + ',"object":"text_completion","created":' + str(ctx.created)
            + ',"model":' + dumps(ctx.model) + ',"system_fingerprint":null,"choices":[')
    tail = "]" + usage_field + "}\n\n"
    n = ctx.n
    streamers = [TextStreamer(n, ctx.stops) for _ in run.prompts]
    offsets = [0] * (n * len(run.prompts))
    try:
        if ctx.echo:
            yield "".join(
                "data: " + head + dumps({"index": p * n + i, "text": ctx.prompt_texts[p], "logprobs": None,
                                         "finish_reason": None}) + tail
                for p in range(len(run.prompts)) for i in range(n)
            ).encode()
            offsets = [len(ctx.prompt_texts[p]) for p in range(len(run.prompts)) for _ in range(n)]
        async for batch in run.items():
            parts = []
            for prompt_index, item in batch:
                for delta in streamers[prompt_index].deltas(item):
                    if not delta.text and not delta.logprobs and delta.finish_reason is None:
                        continue
                    index = prompt_index * n + delta.index
                    logprobs = None
                    if ctx.logprobs is not None:
                        logprobs, offsets[index] = ctx.completion_logprobs(delta.logprobs, offsets[index])
                    choice = {"index": index, "text": delta.text, "logprobs": logprobs,
                              "finish_reason": delta.finish_reason}
                    parts.append("data: " + head + dumps(choice) + tail)
            if parts:
                yield "".join(parts).encode()
        if ctx.include_usage:
            yield ("data: " + head + "]," + '"usage":' + dumps(ctx.usage(run.finals)) + "}\n\n").encode()
        yield DONE
    except Exception as error:
        logger.exception("stream %s failed", ctx.request_id)
        yield _error_event(f"the engine failed while streaming: {type(error).__name__}", ctx.request_id)
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await run.close()
