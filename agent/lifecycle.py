"""Readiness and the graceful drain: what a replica does between SIGTERM and its exit.

A load balancer (Kubernetes' readiness probe) asks `GET /readyz`; `GET /healthz` stays the
liveness probe. On SIGTERM (`parley serve` hooks uvicorn's handler, agent.front.server):

1. `/readyz` answers 503 at once, so no new traffic is routed here;
2. new HTTP requests get a retryable 503 (`server_shutting_down`, `Retry-After`), new
   WebSockets an `error` event and close code 1012 (service restart);
3. HTTP requests in flight (a streaming chat completion included) run to their end;
4. each live realtime session finishes the response in progress, then is closed with
   1012 and an `error` event that names its `conversation_id`: its state is in the store,
   so the client reconnects (to another replica) with it and carries on;
5. the process exits when all of that is done, or `shutdown_grace_s` after the signal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from agent.errors import error_object

log = logging.getLogger(__name__)

# Probes and scrapes are answered while draining: they are how the drain is watched.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1
CLOSE_RESTART = 1012     # WebSocket "service restart": reconnect, elsewhere


def shutting_down_message(conversation_id: str | None = None) -> str:
    message = "This Parley replica is shutting down; retry the request (another replica " \
              "will answer)."
    if conversation_id is not None:
        message = ("This Parley replica is shutting down. Reconnect with "
                   f"conversation_id={conversation_id} to carry on the conversation.")
    return message


class Lifecycle:
    """One process's draining flag, its HTTP requests in flight and its live sessions."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_started: float | None = None
        self._requests = 0
        self._sessions: dict[int, Callable[[float], Awaitable[None]]] = {}
        self._changed = asyncio.Condition()
        self._next = 0

    @property
    def busy(self) -> tuple[int, int]:
        """(HTTP requests in flight, live sessions)."""
        return self._requests, len(self._sessions)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def request_started(self) -> None:
        self._requests += 1

    async def request_finished(self) -> None:
        self._requests -= 1
        await self._notify()

    def session_opened(self, wind_up: Callable[[float], Awaitable[None]]) -> int:
        """Register a live session; `wind_up(deadline)` finishes and closes it on drain.
        Returns the handle for `session_closed`."""
        self._next += 1
        self._sessions[self._next] = wind_up
        return self._next

    async def session_closed(self, handle: int) -> None:
        self._sessions.pop(handle, None)
        await self._notify()

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let what runs finish, and return when nothing is left or at
        `grace_s` after the call, whichever is first."""
        if self.draining:
            return
        self.draining = True
        self.drain_started = time.monotonic()
        deadline = self.drain_started + grace_s
        requests, sessions = self.busy
        log.warning("draining: %d requests in flight, %d realtime sessions; exiting within "
                    "%.0f s", requests, sessions, grace_s)
        # Each session winds itself up (its response, then the close) in its own task; the
        # time left at the end is theirs to share.
        winding = [asyncio.ensure_future(wind_up(deadline))
                   for wind_up in list(self._sessions.values())]
        async with self._changed:
            while self._requests or self._sessions:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
        for task in winding:
            task.cancel()
        requests, sessions = self.busy
        if requests or sessions:
            log.error("drain: %d requests and %d sessions still open after %.0f s", requests,
                      sessions, grace_s)
        else:
            log.warning("drained in %.1f s", time.monotonic() - self.drain_started)


class DrainMiddleware:
    """Counts HTTP requests in flight and, while draining, refuses new ones with a
    retryable 503 (probes excepted). WebSockets are the endpoints' to refuse: a browser
    cannot read a refused handshake's status, so they accept and say why."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            body = json.dumps(error_object(shutting_down_message(), "server_error",
                                           code="server_shutting_down")).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.lifecycle.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            await self.lifecycle.request_finished()
