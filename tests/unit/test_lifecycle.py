"""The drain (agent.lifecycle) on fakes: what waits for what, and what is refused."""

from __future__ import annotations

import asyncio
import json
import time

from agent.lifecycle import DrainMiddleware, Lifecycle


async def test_drain_waits_for_requests_and_sessions():
    lifecycle = Lifecycle()
    wound_up: list[float] = []
    closed = asyncio.Event()

    async def wind_up(deadline: float) -> None:
        wound_up.append(deadline)
        await closed.wait()           # the session closes once its response is done
        await lifecycle.session_closed(handle)

    handle = lifecycle.session_opened(wind_up)
    await lifecycle.request_started()
    drain = asyncio.create_task(lifecycle.drain(grace_s=30))
    await asyncio.sleep(0)
    assert lifecycle.draining and not drain.done()
    await lifecycle.request_finished()
    await asyncio.sleep(0)
    assert not drain.done()           # the session still runs
    closed.set()
    await asyncio.wait_for(drain, 1)
    assert lifecycle.busy == (0, 0)
    assert len(wound_up) == 1 and wound_up[0] > time.monotonic() + 25


async def test_drain_gives_up_at_the_grace_period():
    lifecycle = Lifecycle()
    cancelled = asyncio.Event()

    async def stuck(deadline: float) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lifecycle.session_opened(stuck)
    started = time.monotonic()
    await lifecycle.drain(grace_s=0.05)
    assert time.monotonic() - started < 1
    await asyncio.wait_for(cancelled.wait(), 1)   # its wind-up does not outlive the drain
    assert lifecycle.busy == (0, 1)


async def test_a_second_drain_returns_at_once():
    lifecycle = Lifecycle()
    await lifecycle.drain(grace_s=1)
    await asyncio.wait_for(lifecycle.drain(grace_s=1000), 0.1)


async def _call(app, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def test_middleware_counts_requests_then_refuses_them_while_draining():
    lifecycle = Lifecycle()
    seen: list[tuple[int, int]] = []

    async def app(scope, receive, send):
        seen.append(lifecycle.busy)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = DrainMiddleware(app, lifecycle)
    assert (await _call(middleware, "/v1/models"))[0] == 200
    assert seen == [(1, 0)] and lifecycle.busy == (0, 0)

    await lifecycle.drain(grace_s=1)
    status, headers, body = await _call(middleware, "/v1/chat/completions")
    assert status == 503 and headers[b"retry-after"] == b"1"
    error = json.loads(body)["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert "retry" in error["message"]
    # The probes still answer: they are how the drain is watched.
    assert (await _call(middleware, "/readyz"))[0] == 200
    assert (await _call(middleware, "/healthz"))[0] == 200
