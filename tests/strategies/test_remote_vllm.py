"""Optional: the remote backend against a real vLLM server (see docs/remote_vllm.md).

Runs only when THINKWISE_VLLM_URL names a running vLLM (e.g. http://127.0.0.1:8765/v1);
THINKWISE_VLLM_MODEL names its model (default: the first one /v1/models lists). The
server must be idle and used by nobody else: the tests compare thinkwise's costs with
vLLM's own Prometheus counters.
"""

from __future__ import annotations

import os

import httpx
import pytest

from thinkwise import SamplingParams
from thinkwise.strategies.remote import RemoteBackend, solve_remote
from thinkwise.strategies.remote_counters import metrics_url, parse_counters

URL = os.environ.get("THINKWISE_VLLM_URL")
pytestmark = pytest.mark.skipif(not URL, reason="no vLLM server: set THINKWISE_VLLM_URL=http://host:port/v1 to a "
                                                "running vLLM (docs/remote_vllm.md says how to start one on CPU)")
QUESTION = "Write one random sentence about an animal."


@pytest.fixture(scope="module")
def vllm():
    base = URL.rstrip("/") + ("" if URL.rstrip("/").endswith("/v1") else "/v1")
    try:
        models = httpx.get(base + "/models", timeout=10).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        pytest.fail(f"THINKWISE_VLLM_URL={URL} is set but does not answer /v1/models: {error}")
    model = os.environ.get("THINKWISE_VLLM_MODEL") or models[0]["id"]
    if parse_counters(httpx.get(metrics_url(base), timeout=10).text).server != "vllm":
        pytest.fail(f"{URL} is not a vLLM server (no vllm: counters in /metrics)")
    return base, model


def counters(base):
    reading = parse_counters(httpx.get(metrics_url(base), timeout=10).text)
    return reading.prompt_tokens, reading.generation_tokens


def test_majority_and_short_m_costs_equal_vllms_counters(vllm):
    base, model = vllm
    params = SamplingParams(temperature=1.0, max_tokens=32, seed=0)
    before = counters(base)
    majority = solve_remote(RemoteBackend(base, model=model), QUESTION, "majority@4", sampling_params=params)
    after = counters(base)
    assert (majority.cost.prompt_tokens, majority.cost.decode_tokens) == (after[0] - before[0], after[1] - before[1])
    # short-m@k: the finished streams were read to their usage, so the prompt counts match exactly;
    # with server_counters the generation too (tokens in flight at the abort included).
    short = solve_remote(RemoteBackend(base, model=model, server_counters=True), QUESTION, "short-1@4",
                         sampling_params=params)
    assert short.cost.prompt_tokens == majority.cost.prompt_tokens
    assert "vllm:prompt_tokens_total" in short.cost_basis


def test_consecutive_seeds_share_no_sample_on_vllm(vllm):
    base, model = vllm

    def texts(seed: int, **options) -> list[str]:
        params = SamplingParams(temperature=1.0, max_tokens=24, seed=seed)
        answer = solve_remote(RemoteBackend(base, model=model, **options), QUESTION, "majority@4",
                              sampling_params=params, extract=lambda t: None)
        return [s.text for s in answer.samples]

    # Samples "match" when their first 40 characters do: vLLM on CPU is not bitwise reproducible
    # across batch compositions, so a repeated seed gives the same start and may drift later.
    def matches(a: list[str], b: list[str]) -> int:
        return sum(1 for x in a for y in b if x[:40] == y[:40])

    # The control: one n=4 request lets vLLM seed sample i with seed + i, so seed 1 repeats seed 0.
    shared0, shared1 = texts(0, per_sample_requests=False), texts(1, per_sample_requests=False)
    assert sum(x[:40] == y[:40] for x, y in zip(shared1[:3], shared0[1:])) >= 2
    # thinkwise's hashed per-sample seeds: the same runs share nothing.
    assert matches(texts(0), texts(1)) == 0
