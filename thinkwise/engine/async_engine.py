"""The engine loop for asyncio consumers (the server, concurrent strategies).

One background thread owns the `Engine` and steps it whenever there is work; every
change to the engine (adding, aborting, forking, forcing tokens) is queued as a
command and applied by that thread between two steps, so the engine itself needs no
locks and a step is never interrupted half-way. Each request gets an asyncio queue;
after every step the thread hands each request the events of its sequences (new
tokens and text, finish reasons) through `call_soon_threadsafe`, so requests from any
number of clients are batched together while each consumer sees only its own stream.
A consumer that stops listening (a client that disconnected) aborts its request, which
frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from thinkwise.engine.engine import Engine, TokenEvent
from thinkwise.engine.outputs import RequestOutput
from thinkwise.engine.sampling_params import SamplingParams

logger = logging.getLogger("thinkwise.engine")
T = TypeVar("T")


@dataclass
class StreamItem:
    """What one engine step produced for one request."""

    request_id: str
    events: list[TokenEvent] = field(default_factory=list)
    final: RequestOutput | None = None  # set once, when the request has finished


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; the request could not complete."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.num_steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="thinkwise-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------------ commands
    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps; return its result."""
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self.error!r})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as error:  # handed to the caller, who raises it
                loop.call_soon_threadsafe(_set_exception, future, error)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(command)
        self._wake.set()
        return await future

    async def add_request(
        self,
        prompt: str | list[int] | None,
        params: SamplingParams,
        *,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its `StreamItem`s arrive on."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()

        def add(engine: Engine) -> str:
            request = engine.add_request(prompt, params, prompt_token_ids=prompt_token_ids, request_id=request_id)
            self._streams[request.request_id] = (loop, stream)
            return request.request_id

        return await self.call(add), stream

    async def generate(
        self,
        prompt: str | list[int] | None,
        params: SamplingParams,
        *,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Stream a request's items; closing the iterator early aborts the request."""
        rid, stream = await self.add_request(prompt, params, prompt_token_ids=prompt_token_ids, request_id=request_id)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed while running request {rid}") from item
                if item.final is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        def abort(engine: Engine) -> None:
            output = engine.abort(request_id)
            self._deliver(request_id, StreamItem(request_id, final=output) if output else None, close=True)

        if self.is_running:
            await self.call(abort)

    # ------------------------------------------------------------------ the loop
    def _deliver(self, request_id: str, item: StreamItem | BaseException | None, close: bool = False) -> None:
        target = self._streams.pop(request_id, None) if close else self._streams.get(request_id)
        if target is None or item is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                command()
            if not engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                result = engine.step()
            except Exception as error:  # an engine bug: fail every live request, keep nothing half-done
                logger.exception("engine step failed; aborting all running requests")
                self.error = error
                for request_id in list(self._streams):
                    self._deliver(request_id, error, close=True)
                break
            self.num_steps += 1
            by_request: dict[str, StreamItem] = {}
            for event in result.events:
                by_request.setdefault(event.request_id, StreamItem(event.request_id)).events.append(event)
            for output in result.finished:
                by_request.setdefault(output.request_id, StreamItem(output.request_id)).final = output
            # One wake-up per consumer loop per step, not one per request: with many
            # streams, per-request call_soon_threadsafe costs the serving loop dearly.
            batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StreamItem]]] = {}
            for request_id, item in by_request.items():
                target = self._streams.pop(request_id, None) if item.final is not None else self._streams.get(request_id)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], item))
            for loop, batch in batches.items():
                try:
                    loop.call_soon_threadsafe(_put_all, batch)
                except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                    pass
        # Drain commands so no awaiting caller hangs forever.
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                break


def _put_all(batch: list[tuple[asyncio.Queue, StreamItem]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
