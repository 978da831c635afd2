"""Reading a server's token counters from Prometheus text (vLLM's and thinkwise's names)."""

from __future__ import annotations

import pytest

from thinkwise.strategies.remote_counters import ServerCountersError, metrics_url, parse_counters

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="qwen"} 176.0
vllm:prompt_tokens_total{engine="1",model_name="qwen"} 4.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="qwen"} 1234.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="qwen"} 32.0
"""

THINKWISE_METRICS = """\
# HELP thinkwise_prompt_tokens_total prompt tokens admitted
# TYPE thinkwise_prompt_tokens_total counter
thinkwise_prompt_tokens_total 44.0
thinkwise_prompt_tokens_created 1.7e9
# HELP thinkwise_generation_tokens_total tokens generated
# TYPE thinkwise_generation_tokens_total counter
thinkwise_generation_tokens_total 99.0
# HELP thinkwise_requests_in_flight generation requests being served
# TYPE thinkwise_requests_in_flight gauge
thinkwise_requests_in_flight 0.0
"""


def test_vllm_counters_are_summed_over_their_label_sets():
    reading = parse_counters(VLLM_METRICS)
    assert reading.server == "vllm"
    assert (reading.prompt_tokens, reading.generation_tokens, reading.cached_prompt_tokens) == (180, 1234, 32)
    assert reading.busy == 3
    assert "vllm:prompt_tokens_total" in reading.names()


def test_thinkwise_counters():
    reading = parse_counters(THINKWISE_METRICS)
    assert (reading.server, reading.prompt_tokens, reading.generation_tokens, reading.busy) == ("thinkwise", 44, 99, 0)


@pytest.mark.parametrize("text", ["", "# just a comment\n", "other_metric_total 3\n",
                                  "vllm:prompt_tokens_total 3\n"])  # a prompt counter alone is not enough
def test_no_known_counters_is_a_clear_error(text):
    with pytest.raises(ServerCountersError, match="no token counters.*server_counters off"):
        parse_counters(text)


def test_garbage_is_a_clear_error():
    with pytest.raises(ServerCountersError, match="not Prometheus text"):
        parse_counters("vllm:prompt_tokens_total{ 3 4 5\n<html>")


@pytest.mark.parametrize("base, expected", [
    ("http://h:8000/v1", "http://h:8000/metrics"), ("http://h:8000/v1/", "http://h:8000/metrics"),
    ("http://h:8000", "http://h:8000/metrics"), ("http://h/prefix/v1", "http://h/prefix/metrics"),
])
def test_metrics_sit_beside_v1(base, expected):
    assert metrics_url(base) == expected
