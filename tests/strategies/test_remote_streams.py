"""The remote backend's stream handling against scripted servers (httpx.MockTransport).

Each fake server streams SSE chunks the way vLLM does (a finish chunk, then a usage chunk
with no choices, then [DONE]) with the timing a test needs, and records which streams
the client closed before their end: the effect a real server sees as an abort.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from thinkwise import SamplingParams
from thinkwise.strategies.remote import RemoteBackend, RemoteServerError, sample_seed, solve_remote_async

PROMPT_TOKENS = 11
DONE = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def chunk(delta: dict, finish=None, index=0) -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": delta, "finish_reason": finish,
         "logprobs": {"content": [{"token": "t", "logprob": -1.0}]} if delta.get("content") or delta.get("reasoning")
         or delta.get("reasoning_content") else None}]})


def usage(completion: int) -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
                          "total_tokens": PROMPT_TOKENS + completion}})


class FakeServer:
    """Streams `script(sample_seed_or_index)` per request; remembers bodies and early closes."""

    def __init__(self, script):
        self.script = script
        self.bodies: list[dict] = []
        self.closed_early: list[int] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        number = len(self.bodies)
        self.bodies.append(body)

        async def stream():
            finished = False
            try:
                async for part in self.script(number):
                    finished = part == DONE  # a client that read [DONE] may close without reading on
                    yield part
            finally:
                if not finished:
                    self.closed_early.append(number)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    def backend(self, **options) -> RemoteBackend:
        backend = RemoteBackend("http://fake/v1", model="m", **options)
        backend._client = httpx.AsyncClient(base_url=backend.base_url, transport=httpx.MockTransport(self.handler))
        return backend


def run(backend: RemoteBackend, strategy: str, params: SamplingParams):
    async def main():
        try:
            return await solve_remote_async(backend, "q", strategy, sampling_params=params,
                                            extract=lambda text: text.strip() or None)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def test_a_finished_samples_usage_is_read_even_after_the_strategy_decided():
    """short-1@2: sample 0 finishes at once but its usage comes 0.3 s later; sample 1 never ends."""

    async def script(number):
        if number == 0:
            yield chunk({"role": "assistant", "content": ""})
            yield chunk({"content": "7"}, finish="stop")
            await asyncio.sleep(0.3)  # the strategy decides in this gap
            yield usage(1)
            yield DONE
        else:
            for _ in range(10_000):
                yield chunk({"content": "x"})
                await asyncio.sleep(0.01)

    server = FakeServer(script)
    answer = run(server.backend(), "short-1@2", SamplingParams(temperature=1.0, max_tokens=50_000, seed=1))
    assert answer.answer == "7" and [s.finish_reason for s in answer.samples] == ["stop", "abort"]
    assert server.closed_early == [1]  # the unfinished sample was aborted; the finished one was read to its end
    # Sample 0's usage (11 prompt + 1 completion) was read, and sample 1's prompt is the same 11 tokens.
    assert answer.cost.prompt_tokens == 2 * PROMPT_TOKENS
    assert answer.cost.decode_tokens == 1 + answer.samples[1].num_tokens
    assert "estimate" not in answer.cost_basis


def test_a_server_that_never_sends_usage_is_not_waited_for_and_the_estimate_is_said():
    async def script(number):
        yield chunk({"content": "7"}, finish="stop")
        await asyncio.sleep(30)  # hostile: the usage never comes

    server = FakeServer(script)
    started = time.monotonic()
    answer = run(server.backend(drain_timeout_s=0.2), "short-1@1", SamplingParams(max_tokens=8, seed=1))
    assert time.monotonic() - started < 10
    assert answer.samples[0].finish_reason == "stop" and server.closed_early == [0]
    assert answer.cost.prompt_tokens == 5  # "q": one byte -> 1 token, + 4 for the message's template
    assert "estimate" in answer.cost_basis and "1 stream(s)" in answer.cost_basis


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_both_reasoning_field_names_are_read(field):
    async def script(number):
        yield chunk({"role": "assistant", "content": ""})
        yield chunk({field: "six times seven"})
        yield chunk({field: " is 42"})
        yield chunk({"content": "42"}, finish="stop")
        yield usage(3)
        yield DONE

    server = FakeServer(script)
    answer = run(server.backend(), "majority@2", SamplingParams(max_tokens=8, seed=3))
    assert [s.text for s in answer.samples] == ["<think>six times seven is 42</think>42"] * 2
    assert answer.cost.decode_tokens == 6 and answer.cost.prompt_tokens == 2 * PROMPT_TOKENS
    assert server.closed_early == []
    assert [b["seed"] for b in server.bodies] == [sample_seed(3, 0), sample_seed(3, 1)]
    assert all(b["n"] == 1 and b["stream_options"] == {"include_usage": True} for b in server.bodies)


def test_an_error_chunk_mid_stream_is_a_clear_error():
    async def script(number):
        yield chunk({"content": "a"})
        yield sse({"error": {"message": "out of KV cache"}})

    with pytest.raises(RemoteServerError, match="mid-stream: out of KV cache"):
        run(FakeServer(script).backend(), "majority@1", SamplingParams(max_tokens=8))
