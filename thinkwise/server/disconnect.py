"""Cancel a handler's work when its HTTP client goes away (which aborts its engine requests).

Shared by the plain completions handlers (`serving`) and the strategy handler
(`strategy_serving`), which import it from here rather than from each other.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from starlette.requests import Request


async def unless_disconnected(http: Request, work) -> Any:
    """Run `work`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, watcher, return_exceptions=True)
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.gather(task, return_exceptions=True)
    return None


async def _disconnected(http: Request) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return

