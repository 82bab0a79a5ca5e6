"""Reading a realtime WebSocket in the multi-process tests (raw `websockets` clients)."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def until(ws: Any, kind: str, timeout: float = 120) -> dict[str, Any]:
    """The next event of type `kind`; an `error` event before it fails the test."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == kind:
                return event
            if event["type"] == "error":
                raise AssertionError(event)
