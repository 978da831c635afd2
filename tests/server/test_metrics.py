"""/metrics parses with the Prometheus text parser, and its counters and histograms move."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(server):
    before = scrape(server)
    for name in ("thinkwise_engine_up", "thinkwise_running_sequences", "thinkwise_waiting_sequences",
                 "thinkwise_kv_blocks_total", "thinkwise_kv_blocks_used", "thinkwise_kv_blocks_free",
                 "thinkwise_requests_in_flight", "thinkwise_time_to_first_token_seconds_count",
                 "thinkwise_inter_token_latency_seconds_count", "thinkwise_prompt_tokens_total",
                 "thinkwise_generation_tokens_total"):
        assert (name, ()) in before, name
    assert value(before, "thinkwise_engine_up") == 1
    assert value(before, "thinkwise_kv_blocks_total") == 2048

    body = {"model": MODEL, "prompt": "count me", "max_tokens": 5, "n": 2, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 200
    usage = [line for line in response.text.split("\n\n") if '"usage":{' in line]
    prompt_tokens = int(usage[0].split('"prompt_tokens":')[1].split(",")[0])
    bad = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": 3}, headers=server.headers)
    assert bad.status_code == 400
    server.wait_idle()

    after = scrape(server)
    route = dict(method="POST", route="/v1/completions")
    assert value(after, "thinkwise_http_requests_total", **route, status="200") == \
        value(before, "thinkwise_http_requests_total", **route, status="200") + 1
    assert value(after, "thinkwise_http_requests_total", **route, status="400") == \
        value(before, "thinkwise_http_requests_total", **route, status="400") + 1
    delta = {name: value(after, name) - value(before, name) for name in (
        "thinkwise_generation_tokens_total", "thinkwise_prompt_tokens_total",
        "thinkwise_time_to_first_token_seconds_count", "thinkwise_inter_token_latency_seconds_count",
        "thinkwise_request_latency_seconds_count")}
    assert delta == {"thinkwise_generation_tokens_total": 10, "thinkwise_prompt_tokens_total": prompt_tokens,
                     "thinkwise_time_to_first_token_seconds_count": 1,
                     "thinkwise_inter_token_latency_seconds_count": 4, "thinkwise_request_latency_seconds_count": 1}
    assert value(after, "thinkwise_finished_sequences_total", finish_reason="length") == \
        value(before, "thinkwise_finished_sequences_total", finish_reason="length") + 2
    assert value(after, "thinkwise_engine_steps_total") > value(before, "thinkwise_engine_steps_total")
    assert value(after, "thinkwise_kv_blocks_used") == 0 and value(after, "thinkwise_requests_in_flight") == 0
