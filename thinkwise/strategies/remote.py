"""Strategies over any OpenAI-compatible server (vLLM, SGLang, or `thinkwise serve`).

`RemoteBackend` gives the strategy controllers the interface `LocalBackend` gives them:
`start(prompt, params)` returns a group of k samples whose token events arrive as they
are generated. By default a group is k concurrent streamed requests with n=1: any one
sample can be aborted alone (closing its stream; servers abort a request whose client
went away), a load balancer can spread them over replicas, each reports its own usage,
and a seeded group sends sample i the seed `mix_seed(seed, i)` (a 63-bit hash) rather
than letting the server use `seed + i` (vLLM does: runs with seeds 0 and 1 would share
samples, and so would adaptive rounds). `per_sample_requests=False` sends one request
with n=k instead (the server may then share the prompt's prefill; its seeding is its own).
Per-token logprobs are asked for only to count tokens exactly, and, for DeepConf
(`confidence_top_k`), with that many top logprobs (at most 20, the OpenAI API's limit):
each token's confidence is then -mean of them, computed here from what the server sent.

Costs. A stream that ran to its end is read to its `usage` chunk or `[DONE]`, even after
the strategy decided (a finished sample's usage follows its finish chunk at once, so this
never waits for tokens nobody uses); a stream closed early counts the tokens received,
and its prompt the tokens the server reported for the same prompt (in this group or an
earlier one); where no such report exists the prompt is estimated from its length and
`cost_basis` says so. With `server_counters=True`, `solve_remote` charges instead the
deltas of the server's own Prometheus counters (`remote_counters.py`), which also see
what usage hides (vLLM prefills each of n samples but reports the prompt once) — every
token the server counted in that window, so only for a server one has to oneself. No
FLOPs or bytes are known for remote hardware.

A prompt may be chat messages (sent to /v1/chat/completions, the server applies its
template), text or token ids (/v1/completions). A chat delta's thinking part is read from
`reasoning_content` (DeepSeek, older vLLM, thinkwise) or `reasoning` (newer vLLM), and a
sample's text is rebuilt as `<think>…</think>` + content, as a local engine writes it.
`aclose()` closes every stream still open, so a cancelled strategy leaves nothing running.

    backend = RemoteBackend("http://gpu-box:8000/v1", model="Qwen/Qwen3-8B")
    answer = solve_remote(backend, "What is 17 * 23?", "short-3@8")
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx

from thinkwise.engine.sampler import mix_seed
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import TokenCounts
from thinkwise.errors import InvalidParameterError, ThinkwiseError
from thinkwise.strategies.remote_counters import CounterDelta, CounterWindow, metrics_url

# A finished sample's usage chunk follows its finish chunk at once; this only bounds a server
# that never sends one (then the stream is closed, as if aborted).
DRAIN_TIMEOUT_S = 2.0
# Bytes per token of a prompt whose token count no server reported (BPE on English and code).
BYTES_PER_TOKEN_ESTIMATE = 4


class RemoteServerError(ThinkwiseError):
    """The remote server refused or failed a request."""


@dataclass
class RemoteOutput:
    counts: TokenCounts = field(default_factory=TokenCounts)
    usage_reported: bool = False  # every stream of the group ran to its usage


def sample_seed(group_seed: int, index: int) -> int:
    """Sample `index`'s seed in a group seeded `group_seed`: a 63-bit hash, never `seed + index`.

    Strategies fold their round into the group seed (adaptive: base + 1_000_003 * round), so
    this is a hash of (base seed, round, sample); test_remote proves the derived seeds free of
    overlap across consecutive base seeds, rounds and the bench's per-problem seeds.
    """
    return mix_seed(group_seed, index)


def prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def estimate_prompt_tokens(prompt) -> int:
    """A rough count for a prompt no server reported on: token ids are exact; text is bytes / 4."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        text = prompt
    else:  # chat messages; a few tokens of template per message
        text = "".join(str(m.get("content") or "") for m in prompt)
        return -(-len(text.encode()) // BYTES_PER_TOKEN_ESTIMATE) + 4 * len(prompt)
    return -(-len(text.encode()) // BYTES_PER_TOKEN_ESTIMATE)


class RemoteGroup:
    """k samples of one prompt on one or more streamed requests; same surface as `SampleGroup`.

    Each stream carries `n` consecutive samples starting at its offset: one stream with
    n=k, or k streams with n=1 (then any one sample can be aborted by closing its stream).
    """

    def __init__(self, backend: RemoteBackend, path: str, bodies: list[tuple[int, dict]], k: int, prompt):
        self.backend, self.path, self.k = backend, path, k
        self.bodies = bodies  # (offset of the stream's first sample, request body)
        self.prompt_key = prompt_key(prompt)
        self.prompt = prompt
        self.contents = [""] * k
        self.reasonings = [""] * k
        self.texts = [""] * k  # what a local engine would have written: <think>reasoning</think>content
        self.num_tokens = [0] * k
        self.finish_reasons: list[str | None] = [None] * k
        self.abort_reasons: list[str | None] = [None] * k
        self.token_confidences: list[list[float]] = [[] for _ in range(k)]
        self.final: RemoteOutput | None = None
        self.estimated_prompts = 0  # streams whose prompt tokens are a length estimate
        self._events: asyncio.Queue = asyncio.Queue()
        self._readers: dict[int, asyncio.Task] = {}  # offset -> reader of that stream
        self._usages: dict[int, dict | None] = {}  # offset -> usage (None: closed before it came)
        self._sizes = dict(bodies)

    @property
    def done(self) -> bool:
        return self.final is not None

    async def open(self) -> None:
        responses = await asyncio.gather(*(self._send(body) for _, body in self.bodies), return_exceptions=True)
        failed = next((r for r in responses if isinstance(r, BaseException)), None)
        if failed is not None:
            for response in responses:
                if isinstance(response, httpx.Response):
                    await response.aclose()
            raise failed
        for (offset, body), response in zip(self.bodies, responses):
            self._readers[offset] = asyncio.create_task(self._read(response, offset, body["n"]))

    async def _send(self, body: dict) -> httpx.Response:
        request = self.backend.client.build_request("POST", self.path, json=body)
        response = await self.backend.client.send(request, stream=True)
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:500]
            raise RemoteServerError(f"remote server answered {response.status_code}: {message}")
        return response

    async def _read(self, response: httpx.Response, offset: int, n: int) -> None:
        usage = None
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RemoteServerError(f"remote server error mid-stream: {chunk['error'].get('message')}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    await self._events.put(self._apply(choice, offset))
        except asyncio.CancelledError:
            raise  # the group closed this stream on purpose (an abort)
        except BaseException as error:  # noqa: BLE001 (handed to the consumer, which re-raises)
            await self._events.put(error)
            raise
        finally:
            await response.aclose()
        self._stream_ended(offset, n, usage)
        if self.final is not None:
            await self._events.put(None)

    def _apply(self, choice: dict, offset: int) -> tuple[int, str | None]:
        index = offset + choice["index"]
        if "delta" in choice:  # chat
            delta = choice["delta"] or {}
            self.reasonings[index] += delta.get("reasoning_content") or delta.get("reasoning") or ""
            self.contents[index] += delta.get("content") or ""
            entries = ((choice.get("logprobs") or {}).get("content")) or []
            tokens = len(entries)
            tops = [[t.get("logprob") for t in (entry.get("top_logprobs") or [])] for entry in entries]
        else:
            self.contents[index] += choice.get("text") or ""
            tokens = len(((choice.get("logprobs") or {}).get("tokens")) or [])
            tops = [list((top or {}).values()) for top in ((choice.get("logprobs") or {}).get("top_logprobs") or [])]
        for values in tops:  # DeepConf token confidence, from the top logprobs the server sent
            values = [v for v in values if isinstance(v, (int, float)) and v == v]
            if values:
                self.token_confidences[index].append(-sum(values) / len(values))
        reasoning = self.reasonings[index]
        self.texts[index] = (f"<think>{reasoning}</think>" if reasoning else "") + self.contents[index]
        self.num_tokens[index] += tokens
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reasons[index] = reason
        return index, reason

    def _stream_ended(self, offset: int, n: int, usage: dict | None) -> None:
        """One stream is over (finished, or closed with `usage` None); the last one settles the group."""
        self._usages[offset] = usage
        for i in range(offset, offset + n):
            if self.finish_reasons[i] is None:
                self.finish_reasons[i] = "abort"
        if len(self._usages) < len(self.bodies):
            return
        counts = TokenCounts()
        reported = [u for u in self._usages.values() if u]
        if reported:  # the same prompt in every stream: what one stream reported holds for all
            self.backend.prompt_tokens_seen[self.prompt_key] = reported[0].get("prompt_tokens", 0)
        for offset, usage in self._usages.items():
            size = self._sizes[offset]["n"]
            if usage:
                prompt = usage.get("prompt_tokens", 0)
                counts.prompt_tokens += prompt
                counts.prompt_tokens_cached += min(prompt, ((usage.get("prompt_tokens_details") or {})
                                                            .get("cached_tokens")) or 0)
                # The server's own count (it may differ from the logprob entries received).
                counts.generated_tokens += usage.get("completion_tokens", 0)
                continue
            # Closed before its usage: the tokens received, and the prompt the server reported
            # for this prompt elsewhere (the server prefilled it before the stream was closed).
            counts.generated_tokens += sum(self.num_tokens[offset:offset + size])
            seen = self.backend.prompt_tokens_seen.get(self.prompt_key)
            if seen is None:
                seen = estimate_prompt_tokens(self.prompt)
                if not (isinstance(self.prompt, list) and all(isinstance(t, int) for t in self.prompt)):
                    self.estimated_prompts += 1
            counts.prompt_tokens += seen
        counts.prompt_tokens_computed = counts.prompt_tokens - counts.prompt_tokens_cached
        counts.aborted_tokens = sum(n for n, r in zip(self.num_tokens, self.finish_reasons) if r == "abort")
        self.backend.estimated_prompts += self.estimated_prompts
        self.final = RemoteOutput(counts, usage_reported=len(reported) == len(self.bodies))

    async def next_events(self) -> list[tuple[int, str | None]]:
        if self.final is not None and self._events.empty():
            return []
        changes = []
        item = await self._events.get()
        while True:
            if isinstance(item, BaseException):
                if isinstance(item, ThinkwiseError):
                    raise item
                raise RemoteServerError(f"the stream from the remote server broke: {item!r}") from item
            if item is not None:
                changes.append(item)
            if self._events.empty():
                return changes
            item = self._events.get_nowait()

    async def wait(self) -> RemoteOutput:
        while self.final is None:
            await self.next_events()
        return self.final

    async def _close_stream(self, offset: int) -> None:
        """End one stream: drain it to its usage if its samples all finished, else close it."""
        reader = self._readers[offset]
        if offset in self._usages:
            return
        n = self._sizes[offset]["n"]
        if all(reason is not None for reason in self.finish_reasons[offset:offset + n]):
            # Nothing left to generate: only the usage chunk is still on its way.
            done, _ = await asyncio.wait({reader}, timeout=self.backend.drain_timeout_s)
            if done:
                if not reader.cancelled() and isinstance(reader.exception(), ThinkwiseError):
                    raise reader.exception()
                return
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass
        except ThinkwiseError:
            raise
        if offset not in self._usages:  # closed before it ended: the server aborts its samples
            self._stream_ended(offset, n, None)
            if self.final is not None:
                await self._events.put(None)

    async def abort_rest(self, reason: str) -> RemoteOutput:
        """Close every stream with an unfinished sample (the server aborts them); drain the others."""
        for i in range(self.k):
            if self.finish_reasons[i] is None:
                self.abort_reasons[i] = reason
        await asyncio.gather(*(self._close_stream(offset) for offset in list(self._readers)))
        return await self.wait()

    async def abort_sample(self, index: int, reason: str) -> None:
        """Close the stream of one sample (needs one request per sample)."""
        offset = next((o for o, body in self.bodies if o <= index < o + body["n"]), None)
        if offset is None or self._sizes[offset]["n"] != 1:
            raise InvalidParameterError("this remote group's samples share one stream; abort them together "
                                        "(abort_rest), or use RemoteBackend(per_sample_requests=True)",
                                        param="strategy")
        if self.finish_reasons[index] is None:
            self.abort_reasons[index] = reason
            await self._close_stream(offset)


class RemoteBackend:
    """Sample groups on an OpenAI-compatible server at `base_url` (ending in /v1)."""

    intensity = 0.0  # the remote hardware is unknown: no effective FLOPs
    tokenizer = None
    is_local = False  # no engine primitives (probes) over HTTP
    USAGE_BASIS = ("remote: prompt, cached and completion tokens as reported in each stream's usage (every "
                   "finished stream is read to its usage); a stream closed early counts the tokens received and "
                   "the prompt tokens the server reported for the same prompt; no FLOPs, bytes or energy")

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 600.0,
                 per_sample_requests: bool = True, server_counters: bool = False,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S):
        # per_sample_requests (default): k requests with n=1 and hashed seeds; False: one request
        # with n=k (the server seeds its samples its own way, vLLM with seed + i).
        # server_counters: solve_remote charges the deltas of the server's /metrics counters.
        self.per_sample_requests = per_sample_requests
        self.server_counters = server_counters
        self.drain_timeout_s = drain_timeout_s
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.metrics_url = metrics_url(self.base_url)
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=30.0)
        self._client: httpx.AsyncClient | None = None
        self._groups: list[RemoteGroup] = []
        self.prompt_tokens_seen: dict[str, int] = {}  # prompt -> the prompt_tokens a server reported for it
        self.estimated_prompts = 0  # streams whose prompt tokens were estimated, since reset_cost()
        self.counter_delta: CounterDelta | None = None  # set by solve_remote with server_counters

    @property
    def cost_basis(self) -> str:
        if self.counter_delta is not None:
            delta = self.counter_delta
            basis = (f"remote: the server's own Prometheus counters ({delta.names}), read before and after the "
                     "strategy: every token the server counted in that window, other clients' included; "
                     "no FLOPs, bytes or energy")
            return basis if delta.settled else basis + "; the server was still busy when they were read"
        if self.estimated_prompts:
            return (self.USAGE_BASIS + f"; the prompt tokens of {self.estimated_prompts} stream(s) closed before "
                    f"any usage of that prompt came are an estimate (prompt bytes / {BYTES_PER_TOKEN_ESTIMATE}, + 4 per chat message)")
        return self.USAGE_BASIS

    def reset_cost(self) -> None:
        """Start a new strategy's cost record (what `cost_basis` describes)."""
        self.estimated_prompts = 0
        self.counter_delta = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Made on first use inside the running event loop (an httpx client belongs to one loop).
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        return self._client

    def request_body(self, prompt, params: SamplingParams) -> tuple[str, dict]:
        if params.thinking_budget is not None:
            raise InvalidParameterError("thinking budgets are enforced inside thinkwise's engine; they cannot run "
                                        "over a remote server", param="strategy")
        body = {"model": self.model, "n": params.n, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k and params.top_k > 0:
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.ignore_eos:
            body["ignore_eos"] = True  # vLLM and thinkwise extension
        top = params.confidence_top_k
        if top > 20:
            raise InvalidParameterError(f"confidence_k={top}: an OpenAI-compatible server sends at most 20 top "
                                        "logprobs per token; use confidence_k <= 20 with a remote backend",
                                        param="confidence_k")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            body.update(messages=prompt, logprobs=True, top_logprobs=top)
            return "/chat/completions", body
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            body.update(prompt=prompt, logprobs=top)
            return "/completions", body
        raise InvalidParameterError("a remote prompt is chat messages, text or token ids", param="prompt")

    def group_bodies(self, body: dict, n: int) -> list[tuple[int, dict]]:
        """The requests of one group: (first sample's index, body) per stream."""
        if not self.per_sample_requests or n == 1 and "seed" not in body:
            return [(0, body)]
        return [(i, {**body, "n": 1, **({"seed": sample_seed(body["seed"], i)} if "seed" in body else {})})
                for i in range(n)]

    async def start(self, prompt, params: SamplingParams) -> RemoteGroup:
        path, body = self.request_body(prompt, params)
        group = RemoteGroup(self, path, self.group_bodies(body, params.n), params.n, prompt)
        try:
            await group.open()
        except httpx.HTTPError as error:
            raise RemoteServerError(f"cannot reach the remote server at {self.base_url}: {error}") from None
        self._groups = [g for g in self._groups if not g.done] + [group]
        return group

    async def aclose(self) -> None:
        """Close every stream still open (the server aborts those samples), then the client."""
        for group in self._groups:
            if not group.done:
                try:
                    await group.abort_rest("the remote backend was closed")
                except ThinkwiseError:
                    pass  # the stream had already failed; closing it is all that is left to do
        self._groups = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def solve_remote_async(backend: RemoteBackend, question, strategy: str, *, k: int | None = None,
                             m: int | None = None, sampling_params: SamplingParams | None = None, extract="auto",
                             verifier=None, options: dict | None = None):
    """`solve_remote` inside a running event loop; leaves the backend's client open.
    `options` sets strategy parameters by name (e.g. {"eta": 10}), as the registry reads them."""
    from thinkwise.strategies import parse_strategy, run_strategy

    spec = parse_strategy(strategy, k=k, m=m, **(options or {}))
    params = sampling_params or SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    text = messages[-1].get("content", "")
    backend.reset_cost()
    window = None
    if backend.server_counters:
        window = CounterWindow(backend.client, backend.metrics_url)
        await window.start()
    answer = await run_strategy(backend, spec, messages, params, prompt_text=text, extract=extract,
                                verifier=verifier)
    if window is not None:
        for group in backend._groups:  # a strategy may leave a stream open (it decided early)
            if not group.done:
                await group.abort_rest("the strategy had decided")
        delta = backend.counter_delta = await window.stop()
        cost = answer.cost
        cost.prompt_tokens = delta.prompt_tokens
        cost.prompt_tokens_cached = min(delta.cached_prompt_tokens, delta.prompt_tokens)
        cost.prompt_tokens_computed = cost.prompt_tokens - cost.prompt_tokens_cached
        cost.decode_tokens = delta.generation_tokens
        answer.cost_basis = backend.cost_basis
    return answer


def solve_remote(backend: RemoteBackend, question, strategy: str, *, k: int | None = None, m: int | None = None,
                 sampling_params: SamplingParams | None = None, extract="auto", verifier=None,
                 options: dict | None = None):
    """Run one strategy on a remote server; `question` is text (sent as a user message) or messages."""

    async def main():
        try:
            return await solve_remote_async(backend, question, strategy, k=k, m=m, sampling_params=sampling_params,
                                            extract=extract, verifier=verifier, options=options)
        finally:
            await backend.aclose()

    return asyncio.run(main())
