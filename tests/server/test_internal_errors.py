"""Internal failures, in process: a 500 that quotes a logged request id, and an engine that dies."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from thinkwise import LLM
from thinkwise.server import ServerSettings, build_app


@pytest.fixture()
def app(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64)
    return build_app(llm, ServerSettings(served_model_names=["tiny"]))


def test_a_bug_is_a_logged_500_with_a_request_id(app, caplog):
    async def broken(*_args, **_kwargs):
        raise RuntimeError("boom: internal detail")

    app.state.serving.completions = broken
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="thinkwise.server"):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert response.status_code == 500
        error = response.json()["error"]
        request_id = response.headers["x-request-id"]
        assert error["type"] == "internal_server_error" and request_id in error["message"]
        assert "boom" not in error["message"]  # internals stay in the log
        assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
        given = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"x-request-id": "abc-1"})
        assert given.headers["x-request-id"] == "abc-1" and "abc-1" in given.json()["error"]["message"]
        # Everything else still works.
        ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_engine_failure_ends_streams_with_an_error_event_and_health_reports_it(app):
    engine = app.state.async_engine.engine

    def failing_step():
        raise RuntimeError("engine bug")

    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine.step = failing_step
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True}) as stream:
            assert stream.status_code == 200
            body = "".join(stream.iter_text())
        events = [block[len("data: "):] for block in body.split("\n\n") if block]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_server_error" and "request id" in error["message"]
        after = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert after.status_code == 500 and after.json()["error"]["type"] == "internal_server_error"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert client.get("/metrics").status_code == 200
