"""The events a realtime session has for its client, in order, bounded.

Producers (the session, its responses) wait while the client reads slowly: backpressure
that paces synthesis to the connection. Once the connection is gone nothing will read
again, so `close()` turns every waiting and later `put` into a drop: a cancelled response
finishing its bookkeeping, or the session closing, can never wait forever on a full
outbox (and then never free its decoder slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
Event = dict[str, Any] | None  # None: the writer flushes what came before, then stops


class Outbox:
    def __init__(self, maxsize: int):
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def qsize(self) -> int:
        return self._queue.qsize()

    async def put(self, event: Event) -> None:
        """Queue `event`, waiting for room; dropped if the outbox is or becomes closed."""
        if self._closed.is_set():
            return
        try:
            self._queue.put_nowait(event)
            return
        except asyncio.QueueFull:
            pass
        await self._unless_closed(self._queue.put(event))

    async def get(self) -> Event:
        """The next event (None at the end); None at once after close()."""
        if self._closed.is_set():
            return None
        got = await self._unless_closed(self._queue.get())
        return got.result() if got.done() and not got.cancelled() else None

    async def _unless_closed(self, step: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run `step` until it completes or the outbox closes (then it is cancelled)."""
        task = asyncio.ensure_future(step)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not task.done():
                task.cancel()
        return task

    def close(self) -> None:
        """No one will read again: release every waiting producer, drop what is queued."""
        self._closed.set()
