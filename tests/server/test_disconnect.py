"""A client that hangs up aborts its request: shown by what the engine stops doing.

Each test starts a request long enough that it cannot finish on its own within the
checks (n=8 samples of 1,900 tokens on a server of its own with a 2,048-token context,
so a natural end needs 1,900 engine steps and seconds; the shared server's 256-token
context ends such a request in half a second), waits until all 8 samples run, hangs up, and then checks the request's
fate from outside: the disconnect is counted, every KV block is free within a second of
that, and the engine ran far fewer steps than the request needed to finish naturally
(each decode step adds one token per sample). Counting the disconnect without aborting
fails the last two checks whatever the machine's speed. The connection is a raw socket,
so hanging up is one `close()` at a moment the test chooses.
"""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

import pytest

from tests.server.conftest import MODEL, start_server, stop_server
from tests.tiny_models import make_tiny_model

N = 8
CONTEXT = 2048
MAX_TOKENS = 1900


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-long-context")
    make_tiny_model("llama", directory, seed=1, max_position_embeddings=CONTEXT)
    srv = start_server(directory, directory / "serve.log", "--max-model-len", str(CONTEXT),
                       "--kv-blocks", str(N * CONTEXT // 16 + 64), "--block-size", "16")
    yield srv
    assert stop_server(srv.process) == 0, srv.log()[-5000:]


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def open_request(server, path: str, body: dict) -> socket.socket:
    address = urlparse(server.url)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    sock.sendall(head.encode() + payload)
    return sock


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def not_refused(sock: socket.socket) -> None:
    """Fail at once if the server already answered with an error (the request never ran)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return
    head = sock.recv(64, socket.MSG_PEEK)
    assert not head or head.startswith(b"HTTP/1.1 200"), head + sock.recv(2000)


def running_samples(server, sock: socket.socket, seen: list) -> bool:
    not_refused(sock)
    seen.append(server.health()["engine"])
    return seen[-1]["running_sequences"] == N


def hang_up_and_check_the_abort(server, path: str, body: dict, max_tokens: int = MAX_TOKENS) -> None:
    server.wait_idle()
    steps_before = metric(server, "thinkwise_engine_steps_total")
    disconnects_before = metric(server, "thinkwise_client_disconnects_total")
    sock = open_request(server, path, body)
    try:
        seen: list = []
        wait_until(lambda: running_samples(server, sock, seen), 60, lambda: f"{N} running samples (last seen: {seen[-3:]})")
        assert server.health()["engine"]["kv_blocks_used"] > 0
    finally:
        sock.close()
    wait_until(lambda: metric(server, "thinkwise_client_disconnects_total") == disconnects_before + 1, 30,
               "the disconnect to be counted")
    # The abort frees the blocks right after the disconnect is counted, before the next step.
    health = wait_until(lambda: (h := server.health())["engine"]["kv_blocks_used"] == 0 and h, 1.0,
                        "every KV block to be free within 1 s of the disconnect")
    assert health["engine"]["running_sequences"] == 0 and health["engine"]["waiting_sequences"] == 0
    steps = metric(server, "thinkwise_engine_steps_total") - steps_before
    time.sleep(0.3)
    assert metric(server, "thinkwise_engine_steps_total") - steps_before == steps, "the engine kept stepping"
    assert steps < max_tokens, f"{steps} engine steps: the samples ran (nearly) to their end instead of aborting"


def test_hanging_up_a_completion_aborts_all_eight_samples(long_server):
    body = {"model": MODEL, "prompt": "hang up on me", "max_tokens": MAX_TOKENS, "n": N, "ignore_eos": True,
            "temperature": 1.0}
    hang_up_and_check_the_abort(long_server, "/v1/completions", body)


def test_hanging_up_a_stream_aborts_all_eight_samples(long_server):
    body = {"model": MODEL, "prompt": "stream, then hang up", "max_tokens": MAX_TOKENS, "n": N,
            "ignore_eos": True, "stream": True}
    hang_up_and_check_the_abort(long_server, "/v1/completions", body)


def test_hanging_up_a_strategy_aborts_every_sample(long_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count: 1 2 3"}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "thinkwise": {"strategy": f"majority@{N}"}}
    hang_up_and_check_the_abort(long_server, "/v1/chat/completions", body)
