"""Prometheus metrics of the server and of the engine behind it.

HTTP responses are counted by route and status; token counters and the latency
histograms (time to first token, inter-token latency, whole request) are fed by the
serving code as streams progress. Engine state (running/waiting sequences, KV blocks in
use) is read at scrape time by a collector rather than pushed every step, so the engine
loop pays nothing for it; each value is a single length read, consistent enough for a
gauge (the exact, step-consistent numbers are in `/health`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0)


class EngineCollector:
    """Gauges read from the engine when /metrics is scraped."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        engine = self.async_engine.engine
        scheduler, blocks = engine.scheduler, engine.block_manager
        free = blocks.num_free_blocks
        yield _gauge("thinkwise_engine_up", "1 while the engine loop is running", int(self.async_engine.is_running))
        yield _gauge("thinkwise_running_sequences", "sequences in the running batch", len(scheduler.running))
        yield _gauge("thinkwise_waiting_sequences", "sequences waiting for KV blocks or a batch slot",
                     len(scheduler.waiting))
        yield _gauge("thinkwise_kv_blocks_total", "KV cache blocks", blocks.num_blocks)
        yield _gauge("thinkwise_kv_blocks_free", "KV cache blocks not held by any sequence", free)
        yield _gauge("thinkwise_kv_blocks_used", "KV cache blocks held by sequences", blocks.num_blocks - free)
        yield _gauge("thinkwise_kv_cache_usage_ratio", "share of KV blocks in use",
                     (blocks.num_blocks - free) / max(1, blocks.num_blocks))
        steps = CounterMetricFamily("thinkwise_engine_steps", "engine steps run")
        steps.add_metric([], self.async_engine.num_steps)
        yield steps
        preemptions = CounterMetricFamily("thinkwise_preemptions", "sequences preempted for lack of KV blocks")
        preemptions.add_metric([], scheduler.num_preemptions)
        yield preemptions


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class ServerMetrics:
    def __init__(self, async_engine=None):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("thinkwise_http_requests", "HTTP responses by method, route and status",
                                     ["method", "route", "status"], registry=registry)
        self.http_latency = Histogram("thinkwise_http_request_duration_seconds", "time to the end of the response",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests_in_flight = Gauge("thinkwise_requests_in_flight", "generation requests being served",
                                        registry=registry)
        self.finished_sequences = Counter("thinkwise_finished_sequences", "samples that ended, by finish reason",
                                          ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("thinkwise_prompt_tokens", "prompt tokens admitted (once per prompt, not per sample)",
                                     registry=registry)
        self.prompt_tokens_cached = Counter("thinkwise_prompt_tokens_cached", "prompt tokens served from the prefix cache",
                                            registry=registry)
        self.generation_tokens = Counter("thinkwise_generation_tokens", "tokens generated, over all samples",
                                         registry=registry)
        self.rejected = Counter("thinkwise_rejected_requests", "generation requests refused before admission, by reason",
                                ["reason"], registry=registry)
        self.aborted = Counter("thinkwise_client_disconnects", "requests aborted because the client went away",
                               registry=registry)
        self.ttft = Histogram("thinkwise_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("thinkwise_inter_token_latency_seconds", "time between a request's successive tokens",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("thinkwise_request_latency_seconds", "request arrival to its last token",
                             buckets=TTFT_BUCKETS, registry=registry)
        if async_engine is not None:
            registry.register(EngineCollector(async_engine))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
