"""Strategies over any OpenAI-compatible server (vLLM, SGLang, or `thinkwise serve`).

`RemoteBackend` gives the strategy controllers the interface `LocalBackend` gives them:
`start(prompt, params)` returns a group of k samples whose token events arrive as they
are generated. A group is one streamed request with `n=k` (so the server can share the
prompt's prefill between samples, as vLLM and thinkwise do), or with
`per_sample_requests=True` k concurrent streamed requests with n=1 (any one sample can
then be aborted alone, and a load balancer can spread them over replicas); either way
per-token logprobs are asked for only to count tokens exactly. Aborting means closing
the stream: servers abort a request whose client went away, and a thinkwise server
frees its KV blocks at once.
Costs are what the server reports in `usage` (prompt, cached and completion tokens);
for a stream closed early, the tokens received so far — no FLOPs or bytes are known for
remote hardware. A request closed before its usage arrived (short-m@k's abort) reports
no prompt tokens, so its prompt counts 0; `Answer.cost_basis` says all this. A prompt
may be chat messages (sent to /v1/chat/completions, the server applies its template),
text or token ids (/v1/completions). `aclose()` closes every stream still open, so a
cancelled strategy leaves nothing running on the server.

    backend = RemoteBackend("http://gpu-box:8000/v1", model="Qwen/Qwen3-8B")
    answer = solve_remote(backend, "What is 17 * 23?", "short-3@8")
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.engine.sequence import TokenCounts
from thinkwise.errors import InvalidParameterError, ThinkwiseError


class RemoteServerError(ThinkwiseError):
    """The remote server refused or failed a request."""


@dataclass
class RemoteOutput:
    counts: TokenCounts = field(default_factory=TokenCounts)
    usage_reported: bool = False


class RemoteGroup:
    """k samples of one prompt on one or more streamed requests; same surface as `SampleGroup`.

    Each stream carries `n` consecutive samples starting at its offset: one stream with
    n=k, or k streams with n=1 (then any one sample can be aborted by closing its stream).
    """

    def __init__(self, backend: RemoteBackend, path: str, bodies: list[tuple[int, dict]], k: int):
        self.backend, self.path, self.k = backend, path, k
        self.bodies = bodies  # (offset of the stream's first sample, request body)
        self.texts = [""] * k
        self.num_tokens = [0] * k
        self.finish_reasons: list[str | None] = [None] * k
        self.abort_reasons: list[str | None] = [None] * k
        self.final: RemoteOutput | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._readers: dict[int, asyncio.Task] = {}  # offset -> reader of that stream
        self._usages: dict[int, dict | None] = {}  # offset -> usage (None: closed before it came)

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
            text = choice["delta"].get("content") or ""
            tokens = len(((choice.get("logprobs") or {}).get("content")) or [])
        else:
            text = choice.get("text") or ""
            tokens = len(((choice.get("logprobs") or {}).get("tokens")) or [])
        self.texts[index] += text
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
        counts.generated_tokens = sum(self.num_tokens)
        counts.aborted_tokens = sum(n for n, r in zip(self.num_tokens, self.finish_reasons) if r == "abort")
        reported = [u for u in self._usages.values() if u]
        counts.prompt_tokens = sum(u.get("prompt_tokens", 0) for u in reported)
        counts.prompt_tokens_cached = sum(((u.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
                                          for u in reported)
        counts.prompt_tokens_computed = counts.prompt_tokens - counts.prompt_tokens_cached
        if len(reported) == len(self.bodies):
            # Every stream ran to its end: the server's own count (it may differ from the
            # logprob entries received, e.g. a server that does not stream logprobs).
            counts.generated_tokens = sum(u.get("completion_tokens", 0) for u in reported)
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
        reader = self._readers[offset]
        if offset in self._usages:
            return
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass
        except ThinkwiseError:
            raise
        if offset not in self._usages:  # closed before it ended: the server aborts its samples
            body = dict(self.bodies)[offset]
            self._stream_ended(offset, body["n"], None)
            if self.final is not None:
                await self._events.put(None)

    async def abort_rest(self, reason: str) -> RemoteOutput:
        """Close every open stream: the server aborts every unfinished sample."""
        for i in range(self.k):
            if self.finish_reasons[i] is None:
                self.abort_reasons[i] = reason
        for offset in list(self._readers):
            await self._close_stream(offset)
        return await self.wait()

    async def abort_sample(self, index: int, reason: str) -> None:
        """Close the stream of one sample (needs one request per sample)."""
        offset = next((o for o, body in self.bodies if o <= index < o + body["n"]), None)
        if offset is None or dict(self.bodies)[offset]["n"] != 1:
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
    cost_basis = ("remote: prompt, cached and completion tokens as reported by the server's usage; a stream "
                  "closed early counts the tokens received and no prompt tokens; no FLOPs, bytes or energy")

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 600.0,
                 per_sample_requests: bool = False):
        # per_sample_requests: k requests with n=1 (seeds seed, seed+1, ...) instead of one with
        # n=k; each sample can then be aborted alone, and a load balancer can spread them.
        self.per_sample_requests = per_sample_requests
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=30.0)
        self._client: httpx.AsyncClient | None = None
        self._groups: list[RemoteGroup] = []

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
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            body.update(messages=prompt, logprobs=True, top_logprobs=0)
            return "/chat/completions", body
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            body.update(prompt=prompt, logprobs=0)
            return "/completions", body
        raise InvalidParameterError("a remote prompt is chat messages, text or token ids", param="prompt")

    async def start(self, prompt, params: SamplingParams) -> RemoteGroup:
        path, body = self.request_body(prompt, params)
        bodies = [(0, body)]
        if self.per_sample_requests and params.n > 1:
            bodies = [(i, {**body, "n": 1, **({"seed": body["seed"] + i} if "seed" in body else {})})
                      for i in range(params.n)]
        group = RemoteGroup(self, path, bodies, params.n)
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


def solve_remote(backend: RemoteBackend, question, strategy: str, *, k: int | None = None, m: int | None = None,
                 sampling_params: SamplingParams | None = None, extract="auto", verifier=None):
    """Run one strategy on a remote server; `question` is text (sent as a user message) or messages."""
    from thinkwise.strategies import parse_strategy, run_strategy

    spec = parse_strategy(strategy, k=k, m=m)
    params = sampling_params or SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    text = messages[-1].get("content", "")

    async def main():
        try:
            return await run_strategy(backend, spec, messages, params, prompt_text=text, extract=extract,
                                      verifier=verifier)
        finally:
            await backend.aclose()

    return asyncio.run(main())
