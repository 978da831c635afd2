"""Bounded load on loopback: 200 concurrent streams of mixed lengths plus 50 clients that hang up.

Every completed stream must be well-formed SSE (`data:` events, `[DONE]` last), its
chunks must match the documented chunk schema, every choice must finish exactly once
having delivered every token (counted through per-token logprobs) and the usage must
add up; none may be lost. The 50 early disconnects must be aborted, and afterwards the
engine must be idle with every KV block free.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL
from thinkwise.server.protocol import ChatCompletionChunk, CompletionResponse

NUM_STREAMS = 200
NUM_DISCONNECTS = 50
LENGTHS = (1, 2, 5, 8, 16, 24, 32, 48, 64)
TIME_LIMIT_S = 150


def _request(i: int, rng: random.Random) -> tuple[str, dict]:
    prompt = "".join(rng.choice("abcdefghij klmnop,.") for _ in range(rng.randint(1, 120)))
    body = {"model": MODEL, "max_tokens": LENGTHS[i % len(LENGTHS)], "n": 2 if i % 10 == 0 else 1, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": i,
            "temperature": rng.choice([0, 0.7, 1.0])}
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}], "logprobs": True}
    return "/v1/completions", {**body, "prompt": prompt, "logprobs": 0}


def _check_stream(path: str, body: dict, text: str) -> None:
    assert text.endswith("data: [DONE]\n\n"), f"stream did not end with [DONE]: {text[-300:]!r}"
    blocks = text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    chat = path.endswith("chat/completions")
    n, max_tokens = body["n"], body["max_tokens"]
    tokens = [0] * n
    finished = [0] * n
    ids, usage = set(), None
    for position, block in enumerate(blocks[:-2]):
        assert block.startswith("data: ") and "\n" not in block, block
        chunk = json.loads(block[len("data: "):])
        assert "error" not in chunk, chunk
        (ChatCompletionChunk if chat else CompletionResponse).model_validate(chunk)
        ids.add(chunk["id"])
        if chunk["choices"] == []:
            assert chunk["usage"] is not None and position == len(blocks) - 3, "usage must be the last chunk"
            usage = chunk["usage"]
            continue
        assert chunk["usage"] is None
        for choice in chunk["choices"]:
            index = choice["index"]
            assert finished[index] == 0, "a chunk after the choice finished"
            if chat and position < n:
                assert choice["delta"] == {"role": "assistant", "content": ""}
            if choice["logprobs"] is not None:
                tokens[index] += len(choice["logprobs"]["content"] if chat else choice["logprobs"]["tokens"])
            if choice["finish_reason"] is not None:
                assert choice["finish_reason"] == "length"
                finished[index] += 1
    assert len(ids) == 1
    assert finished == [1] * n, finished
    assert tokens == [max_tokens] * n, (tokens, max_tokens)
    assert usage is not None and usage["completion_tokens"] == n * max_tokens and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def _complete(http: httpx.AsyncClient, server, path: str, body: dict) -> str:
    async with http.stream("POST", f"{server.url}{path}", json=body, headers=server.headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return "".join([piece async for piece in response.aiter_text()])


async def _hang_up(http: httpx.AsyncClient, server, i: int, rng: random.Random) -> int:
    body = {"model": MODEL, "prompt": f"I will leave early, number {i}", "max_tokens": 200, "ignore_eos": True,
            "stream": True, "n": 1 + i % 3}
    after = rng.randint(1, 6)
    received = 0
    async with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as response:
        assert response.status_code == 200
        async for _ in response.aiter_raw():
            received += 1
            if received >= after:
                break
    return received  # leaving the block closes the connection mid-stream


def _counter(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_concurrent_streams_and_disconnects(server):
    idle_blocks = server.wait_idle()["engine"]["kv_blocks_free"]
    disconnects_before = _counter(server, "thinkwise_client_disconnects_total")
    rng = random.Random(0)
    requests = [_request(i, rng) for i in range(NUM_STREAMS)]

    async def main():
        limits = httpx.Limits(max_connections=NUM_STREAMS + NUM_DISCONNECTS + 10, max_keepalive_connections=50)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
            complete = [asyncio.ensure_future(_complete(http, server, path, body)) for path, body in requests]
            leave = [asyncio.ensure_future(_hang_up(http, server, i, rng)) for i in range(NUM_DISCONNECTS)]
            return await asyncio.wait_for(asyncio.gather(asyncio.gather(*complete, return_exceptions=True),
                                                         asyncio.gather(*leave, return_exceptions=True)),
                                          timeout=TIME_LIMIT_S)

    started = time.monotonic()
    texts, left = asyncio.run(main())
    elapsed = time.monotonic() - started
    failures = [(i, t) for i, t in enumerate(texts) if isinstance(t, BaseException)]
    assert not failures, f"{len(failures)} streams failed, first: {failures[0]!r}"
    assert not [x for x in left if isinstance(x, BaseException)], left
    for (path, body), text in zip(requests, texts):
        _check_stream(path, body, text)

    health = server.wait_idle(timeout=10)
    engine = health["engine"]
    assert engine["running_sequences"] == 0 and engine["waiting_sequences"] == 0, health
    assert engine["kv_blocks_used"] == 0 and engine["kv_blocks_free"] == idle_blocks, health
    assert health["requests_in_flight"] == 0 and health["sequences_in_flight"] == 0, health
    assert _counter(server, "thinkwise_client_disconnects_total") - disconnects_before == NUM_DISCONNECTS
    # Still serving.
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "after the storm", "max_tokens": 3},
                    headers=server.headers, timeout=30)
    assert ok.status_code == 200, ok.text
    print(f"load: {NUM_STREAMS} streams + {NUM_DISCONNECTS} disconnects in {elapsed:.1f} s")
