"""A remote server's own token counters, read from its Prometheus `/metrics` endpoint.

A stream's `usage` says what the server chose to report for that request; the server's
counters say what it computed. The two differ where a server prefills each of n samples
but reports the prompt once (vLLM), or where a stream was closed before its usage came.
`CounterWindow` scrapes the counters before and after a strategy and gives their deltas:
prompt and generation tokens as the server counted them. Every request the server ran
in that window is included, other clients' too, so a caller opts in only where it has
the server to itself (a benchmark, a dedicated replica).

Known counter families (Prometheus text; each summed over its label sets, e.g. vLLM's
`model_name`/`engine`):
- vLLM: `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, and the cache hits
  `vllm:prefix_cache_hits_total`; busy while `vllm:num_requests_running` or
  `vllm:num_requests_waiting` is above 0.
- thinkwise: `thinkwise_prompt_tokens_total`, `thinkwise_generation_tokens_total`,
  `thinkwise_prompt_tokens_cached_total`; busy while `thinkwise_requests_in_flight` > 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from thinkwise.errors import ThinkwiseError

# server -> (prompt, generation, cached prompt, gauges whose sum is the work still in progress)
FAMILIES = {
    "vllm": ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total",
             ("vllm:num_requests_running", "vllm:num_requests_waiting")),
    "thinkwise": ("thinkwise_prompt_tokens_total", "thinkwise_generation_tokens_total",
                  "thinkwise_prompt_tokens_cached_total", ("thinkwise_requests_in_flight",)),
}


class ServerCountersError(ThinkwiseError):
    """The server's /metrics could not be read or holds no known token counters."""


@dataclass(frozen=True)
class CounterReading:
    server: str  # "vllm" or "thinkwise": whose counter names were found
    prompt_tokens: float
    generation_tokens: float
    cached_prompt_tokens: float
    busy: float  # requests running or waiting when scraped

    def names(self) -> str:
        prompt, generation, _, _ = FAMILIES[self.server]
        return f"{prompt}, {generation}"


def parse_counters(text: str) -> CounterReading:
    """The token counters in a Prometheus text exposition; raises if neither server's are there."""
    samples: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + float(sample.value)
    except ValueError as error:
        raise ServerCountersError(f"the server's /metrics is not Prometheus text: {error}") from None
    for server, (prompt, generation, cached, gauges) in FAMILIES.items():
        if prompt in samples and generation in samples:
            return CounterReading(server, samples[prompt], samples[generation], samples.get(cached, 0.0),
                                  sum(samples.get(g, 0.0) for g in gauges))
    known = "; ".join(f"{p} and {g}" for p, g, _, _ in FAMILIES.values())
    raise ServerCountersError(f"the server's /metrics has no token counters thinkwise knows ({known}); "
                              "leave server_counters off to charge the streams' usage instead")


def metrics_url(base_url: str) -> str:
    """`/metrics` sits at the server's root, beside `/v1` (vLLM and thinkwise both)."""
    root = base_url.rstrip("/")
    return (root[:-3] if root.endswith("/v1") else root) + "/metrics"


async def read_counters(client: httpx.AsyncClient, url: str) -> CounterReading:
    try:
        response = await client.get(url)
    except httpx.HTTPError as error:
        raise ServerCountersError(f"cannot read the server's counters at {url}: {error}") from None
    if response.status_code != 200:
        raise ServerCountersError(f"the server's {url} answered {response.status_code}; leave server_counters "
                                  "off, or expose /metrics")
    return parse_counters(response.text)


@dataclass(frozen=True)
class CounterDelta:
    server: str
    names: str
    prompt_tokens: int
    generation_tokens: int
    cached_prompt_tokens: int
    settled: bool  # False: the server was still busy (or counting) when the wait ran out


class CounterWindow:
    """Counter deltas around a piece of work: `await start()`, run it, `await stop()`."""

    def __init__(self, client: httpx.AsyncClient, url: str, settle_timeout_s: float = 10.0,
                 poll_s: float = 0.2):
        self.client, self.url = client, url
        self.settle_timeout_s, self.poll_s = settle_timeout_s, poll_s
        self.before: CounterReading | None = None

    async def start(self) -> CounterReading:
        self.before = await read_counters(self.client, self.url)
        return self.before

    async def stop(self) -> CounterDelta:
        """Wait until the server is idle and its counters stop moving, then take the deltas.

        A closed stream is aborted by the server a moment later, and its last tokens are
        counted then; reading at once would miss them.
        """
        assert self.before is not None, "start() first"
        deadline = time.monotonic() + self.settle_timeout_s
        last = await read_counters(self.client, self.url)
        settled = False
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s)
            now = await read_counters(self.client, self.url)
            steady = (now.prompt_tokens, now.generation_tokens) == (last.prompt_tokens, last.generation_tokens)
            last = now
            if steady and now.busy == 0:
                settled = True
                break
        before = self.before
        return CounterDelta(last.server, last.names(), round(last.prompt_tokens - before.prompt_tokens),
                            round(last.generation_tokens - before.generation_tokens),
                            round(last.cached_prompt_tokens - before.cached_prompt_tokens), settled)
