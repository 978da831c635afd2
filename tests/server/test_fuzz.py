"""schemathesis fuzzes the server's own OpenAPI schema: no 5xx, responses as documented, server alive after.

Each operation gets schema-valid (positive) and schema-violating (negative) requests
from schemathesis' hypothesis strategies, driven here directly (its pytest plugin does
not support this pytest). Bounded: a fixed number of examples per operation and mode,
and the session server's small limits (256-token context, n <= 8) keep any accepted
request cheap.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL

MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers)  # the docs need the key
    found = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health"} <= set(found)
    return found


# Every check but positive_data_acceptance ("any schema-valid request gets a 2xx"): some limits
# are not expressible in a schema — a prompt longer than the context, min_tokens > max_tokens,
# top_logprobs without logprobs — and those schema-valid requests rightly get a 400.
EXCLUDED_CHECKS = [schemathesis.checks.positive_data_acceptance]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


@pytest.mark.parametrize(("label", "mode"), [
    ("POST /v1/chat/completions", POSITIVE), ("POST /v1/chat/completions", NEGATIVE),
    ("POST /v1/completions", POSITIVE), ("POST /v1/completions", NEGATIVE),
    ("GET /v1/models/{model_id}", POSITIVE), ("GET /v1/models/{model_id}", NEGATIVE),
    ("GET /v1/models", POSITIVE), ("GET /health", POSITIVE), ("GET /metrics", POSITIVE),
], ids=lambda value: value.value if isinstance(value, schemathesis.GenerationMode) else value)
def test_fuzzed_requests_never_break_the_server(server, operations, label, mode):
    operation = operations[label]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call_and_validate(headers=server.headers, timeout=60, excluded_checks=EXCLUDED_CHECKS)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    statuses: dict[int, int] = {}
    check()
    print(f"{label} {mode.value}: statuses {dict(sorted(statuses.items()))}")
    assert not [status for status in statuses if status >= 500], statuses
    if mode is POSITIVE:
        assert 200 in statuses, statuses  # the fuzzer reached the engine, not only the validators


def test_server_alive_and_clean_after_fuzzing(server):
    health = server.wait_idle(timeout=30)
    assert health["status"] == "ok" and health["engine"]["kv_blocks_used"] == 0, health
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=30,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}],
                                "max_tokens": 3})
    assert response.status_code == 200, response.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    server_errors = [(s.labels, s.value) for f in text_string_to_metric_families(metrics) for s in f.samples
                     if s.name == "thinkwise_http_requests_total" and s.labels["status"].startswith("5")]
    assert not server_errors, server_errors
