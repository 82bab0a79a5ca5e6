"""Per-API-key limits that every replica shares, kept in the state store.

- **Requests**: a token bucket per key (`rate_limit_requests_per_minute`), refilled
  continuously; each API request takes one token. One Lua script reads the time from
  Redis itself, so replicas with skewed clocks agree.
- **Concurrent realtime sessions** (`rate_limit_sessions`, phone calls included): a sorted
  set per key of session ids scored by when their claim lapses. A live session renews its
  claim every `SESSION_RENEW_S`; one whose replica died lapses after `SESSION_CLAIM_S`.

Keys are known by their fingerprint (`key_…`), never stored as themselves. A limit of 0 is
off. If the store cannot be reached the check lets the request through (and says so in
the log): the request then meets the store's own 503 where it needs the store.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

from agent.config import Settings
from agent.errors import StoreUnavailableError
from agent.state.store import Store

log = logging.getLogger(__name__)

SESSION_CLAIM_S = 60
SESSION_RENEW_S = 20

# KEYS[1] bucket; ARGV: capacity, tokens per second, take (1) or peek (0).
# Returns {allowed, tokens left, seconds until one token} (numbers as strings: Lua would
# truncate them to integers).
_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  allowed = 1
  if ARGV[3] == '1' then tokens = tokens - 1 end
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
end
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate end
return {allowed, tostring(tokens), tostring(wait)}
"""

# KEYS[1] sessions set; ARGV: limit, session id, claim seconds, "open" | "renew" | "count".
# Returns {allowed, sessions now}.
_SESSIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
local mode = ARGV[4]
if mode == 'count' then return {1, count} end
local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
if mode == 'open' and not held and count >= tonumber(ARGV[1]) then return {0, count} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 1000)
if not held then count = count + 1 end
return {1, count}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float      # until the next token (0 when one is there)
    reset_s: float            # until the bucket is full again (requests) or 0

    def rate_limit(self, name: str) -> dict[str, object]:
        """The entry of the realtime `rate_limits.updated` event."""
        return {"name": name, "limit": self.limit, "remaining": self.remaining,
                "reset_seconds": round(self.reset_s, 3)}


class Limits:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.requests_per_minute = settings.rate_limit_requests_per_minute
        self.sessions = settings.rate_limit_sessions

    async def _bucket(self, key_id: str, take: bool, limit: int | None) -> Verdict | None:
        capacity = self.requests_per_minute if limit is None else limit
        if capacity <= 0:
            return None
        rate = capacity / 60.0
        try:
            allowed, tokens, wait = await self.store.eval(
                _BUCKET, [self.store.key("limit_requests", key_id)],
                [capacity, rate, 1 if take else 0])
        except StoreUnavailableError as exc:
            log.warning("request limit not checked (%s): %s", key_id, exc.message)
            return None
        left = float(tokens)
        return Verdict(bool(int(allowed)), capacity, max(0, math.floor(left)), float(wait),
                       (capacity - left) / rate)

    async def take_request(self, key_id: str, limit: int | None = None) -> Verdict | None:
        """One request by `key_id`: whether it may go ahead; None when unlimited. `limit`:
        the key's own requests per minute, over the server's."""
        return await self._bucket(key_id, True, limit)

    async def requests_left(self, key_id: str, limit: int | None = None) -> Verdict | None:
        return await self._bucket(key_id, False, limit)

    async def _sessions(self, key_id: str, session_id: str, mode: str,
                        limit: int | None) -> Verdict | None:
        most = self.sessions if limit is None else limit
        if most <= 0:
            return None
        try:
            allowed, count = await self.store.eval(
                _SESSIONS, [self.store.key("limit_sessions", key_id)],
                [most, session_id, SESSION_CLAIM_S, mode])
        except StoreUnavailableError as exc:
            log.warning("session limit not checked (%s): %s", key_id, exc.message)
            return None
        return Verdict(bool(int(allowed)), most, max(0, most - int(count)),
                       0.0 if allowed else float(SESSION_RENEW_S), 0.0)

    async def open_session(self, key_id: str, session_id: str,
                           limit: int | None = None) -> Verdict | None:
        """Claim a session slot for `session_id`; not allowed when the key has them all."""
        return await self._sessions(key_id, session_id, "open", limit)

    async def renew_session(self, key_id: str, session_id: str,
                            limit: int | None = None) -> None:
        await self._sessions(key_id, session_id, "renew", limit)

    async def sessions_left(self, key_id: str, limit: int | None = None) -> Verdict | None:
        return await self._sessions(key_id, "", "count", limit)

    async def close_session(self, key_id: str, session_id: str) -> None:
        with contextlib.suppress(StoreUnavailableError):  # else its claim lapses by itself
            await self.store.zrem("limit_sessions", key_id, session_id)
