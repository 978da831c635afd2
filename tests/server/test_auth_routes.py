"""The API key guards every `/v1` route the server publishes, whatever the route or method.

The routes are read from the app's own OpenAPI schema, so a route added later without the
key check fails here without anyone having to remember to list it. Each one gets no key,
a wrong key, a key in the wrong scheme and a key that only starts like the right one: all
must be 401 with an OpenAI-style error body, and the right key must get past the check
(any status but 401). In process (FastAPI's TestClient on the tiny model), so it is fast.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from thinkwise import LLM
from thinkwise.server import ServerSettings, build_app

KEY = "route-key-42"
MODEL = "tiny"
# A well-formed body per known route, so a 401 cannot be blamed on the body; routes not
# listed get an empty JSON object (the key is checked whatever the body).
BODIES = {
    "/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 1},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
}
BAD_HEADERS = {
    "no key": {},
    "wrong key": {"Authorization": "Bearer wrong"},
    "empty bearer": {"Authorization": "Bearer "},
    "a prefix of the key": {"Authorization": f"Bearer {KEY[:-1]}"},
    "the key plus more": {"Authorization": f"Bearer {KEY}x"},
    "wrong scheme": {"Authorization": f"Basic {KEY}"},
    "key in another header": {"X-Api-Key": KEY},
}


@pytest.fixture(scope="module")
def client(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64)
    with TestClient(build_app(llm, ServerSettings(served_model_names=[MODEL], api_key=KEY))) as c:
        yield c


@pytest.fixture(scope="module")
def routes(client) -> list[tuple[str, str]]:
    schema = client.app.openapi()
    found = [(method.upper(), path) for path, item in schema["paths"].items() if path.startswith("/v1")
             for method in item if method in ("get", "post", "put", "patch", "delete")]
    # The schema must list at least what the OpenAI clients use.
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")} <= set(found)
    return found


def call(client, method: str, path: str, headers: dict):
    url = re.sub(r"\{[^}]*\}", MODEL, path)  # path parameters (e.g. a model id)
    body = BODIES.get(path, {}) if method != "GET" else None
    return client.request(method, url, headers=headers, json=body)


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_every_v1_route_refuses_a_missing_or_wrong_key(client, routes, case):
    for method, path in routes:
        response = call(client, method, path, BAD_HEADERS[case])
        assert response.status_code == 401, f"{method} {path} with {case}: {response.status_code} {response.text}"
        error = response.json()["error"]
        assert "API key" in error["message"] and error["type"], (method, path, error)


def test_every_v1_route_accepts_the_right_key(client, routes):
    for method, path in routes:
        response = call(client, method, path, {"Authorization": f"Bearer {KEY}"})
        assert response.status_code != 401, f"{method} {path}: {response.text}"
        if path in BODIES or method == "GET":
            assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"


def test_probes_need_no_key(client):
    for path in ("/health", "/metrics"):
        assert client.get(path).status_code == 200


def test_without_a_configured_key_every_v1_route_is_open(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64)
    with TestClient(build_app(llm, ServerSettings(served_model_names=[MODEL]))) as open_client:
        paths = open_client.app.openapi()["paths"]
        for path, item in paths.items():
            if path.startswith("/v1"):
                for method in item:
                    response = call(open_client, method.upper(), path, {})
                    assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
