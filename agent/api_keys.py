"""API keys: the key a server runs with, and checking the one a client presents.

Keys come from settings and arrive as `Authorization: Bearer <key>` (HTTP: front/auth.py)
or in a WebSocket's subprotocols (realtime/credentials.py); both check them here. Two
kinds:

- plain keys, `PARLEY_API_KEYS=k1,k2`: any endpoint, the server's limits, the tools
  config's permissions;
- keys kept only as their SHA-256, each with its own scopes, in the TOML file:

      [keys.support-bot]
      hash = "sha256:9f86d0…"        # parley key-hash KEY prints it
      endpoints = ["chat", "realtime"]   # of ENDPOINTS; default: all
      tools = ["search_*", "order_status"]   # tool-name patterns; default: tools config
      requests_per_minute = 120      # default: rate_limit_requests_per_minute
      max_sessions = 4               # default: rate_limit_sessions
      execute_tools = true           # chat and realtime run its tools server-side

A request acts as its *principal*: a plain key itself, or `sha256:<hash>` for a hashed
key, so that nothing downstream (tool permissions, ledgers, limits, client secrets) ever
needs the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass

from agent.config import Settings
from agent.errors import ConfigError

# Endpoint scopes: what a path needs (front/auth.py); the realtime socket needs "realtime".
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/audio/speech": "speech",
             "/v1/audio/transcriptions": "transcriptions", "/v1/realtime": "realtime",
             "/v1/realtime/client_secrets": "realtime", "/v1/realtime/sessions": "realtime",
             "/v1/models": "models", "/metrics": "metrics"}
HASHED = "sha256:"
_SCOPE_FIELDS = {"hash", "endpoints", "tools", "requests_per_minute", "max_sessions",
                 "execute_tools"}


@dataclass(frozen=True)
class KeyScope:
    name: str
    digest: str                              # SHA-256 of the key, hex
    endpoints: frozenset[str] | None = None  # None: every endpoint
    tools: tuple[str, ...] | None = None     # None: the tools config decides
    requests_per_minute: int | None = None   # None: the server's setting
    max_sessions: int | None = None
    execute_tools: bool = False

    @property
    def principal(self) -> str:
        return HASHED + self.digest

    def allows(self, endpoint: str | None) -> bool:
        return endpoint is None or self.endpoints is None or endpoint in self.endpoints


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Parsed scopes by the identity of the settings' `keys` table (kept beside them, so an id
# is never reused): every request asks, and the table never changes once loaded.
_PARSED: dict[int, tuple[object, tuple[KeyScope, ...]]] = {}


def key_scopes(settings: Settings) -> tuple[KeyScope, ...]:
    """The hashed keys of the configuration; ConfigError names what is wrong."""
    if not settings.keys:
        return ()
    cached = _PARSED.get(id(settings.keys))
    if cached is not None and cached[0] is settings.keys:
        return cached[1]
    scopes = _parse_scopes(settings)
    _PARSED[id(settings.keys)] = (settings.keys, scopes)
    return scopes


def _parse_scopes(settings: Settings) -> tuple[KeyScope, ...]:
    scopes = []
    for name, table in settings.keys.items():
        where = f"keys.{name}"
        if unknown := sorted(set(table) - _SCOPE_FIELDS):
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        given = str(table.get("hash", ""))
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", given):
            raise ConfigError(f"{where}.hash must be 'sha256:' and 64 hex digits "
                              "(parley key-hash KEY prints it)")
        endpoints = table.get("endpoints")
        known = set(ENDPOINTS.values())
        if endpoints is not None and not (isinstance(endpoints, list)
                                          and set(endpoints) <= known):
            raise ConfigError(f"{where}.endpoints: a list of {', '.join(sorted(known))}")
        tools = table.get("tools")
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, str) for t in tools)):
            raise ConfigError(f"{where}.tools: a list of tool-name patterns")
        limits = {}
        for field in ("requests_per_minute", "max_sessions"):
            value = table.get(field)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{where}.{field}: a whole number, 0 for no limit")
            limits[field] = value
        scopes.append(KeyScope(
            name, given.removeprefix(HASHED),
            None if endpoints is None else frozenset(endpoints),
            None if tools is None else tuple(tools), limits["requests_per_minute"],
            limits["max_sessions"], bool(table.get("execute_tools", False))))
    return tuple(scopes)


def scope_of(principal: str | None, settings: Settings) -> KeyScope | None:
    """The hashed key's scope a principal stands for (None for a plain key or none)."""
    if principal is None or not principal.startswith(HASHED):
        return None
    digest = principal.removeprefix(HASHED)
    return next((s for s in key_scopes(settings) if hmac.compare_digest(s.digest, digest)),
                None)


def principal_of(token: str | None, settings: Settings) -> str | None:
    """What a presented key acts as: a plain key itself, `sha256:<hash>` for a hashed
    one, None when it is neither (every key compared, in constant time)."""
    if token is None:
        return None
    plain = [hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys]
    digest = key_digest(token)
    hashed = [s for s in key_scopes(settings) if hmac.compare_digest(s.digest, digest)]
    if any(plain):
        return token
    return hashed[0].principal if hashed else None


def executes_tools(principal: str | None, settings: Settings) -> bool:
    """Whether chat and realtime run this key's tools server-side by default."""
    scope = scope_of(principal, settings)
    return scope is not None and scope.execute_tools


def tool_patterns(settings: Settings) -> dict[str, tuple[str, ...]]:
    """principal → tool-name patterns, for the hashed keys that set `tools`."""
    return {s.principal: s.tools for s in key_scopes(settings) if s.tools is not None}


def principals(settings: Settings) -> list[str]:
    """Every principal the configuration knows: the plain keys, then the hashed ones."""
    return [*settings.api_keys, *(s.principal for s in key_scopes(settings))]

KEY_FILE = "api_key"

log = logging.getLogger(__name__)


def with_api_keys(settings: Settings) -> Settings:
    """Settings with at least one key, unless auth is explicitly off.

    With no key configured, Parley makes one on first start and keeps it in the cache
    folder (mode 0600), so a fresh install is never an open server by accident.
    """
    if settings.api_keys or settings.keys or settings.auth_disabled:
        if settings.auth_disabled:
            log.warning("authentication is disabled (auth_disabled): any client may call")
        return settings
    path = settings.cache_dir / KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "sk-parley-" + secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
    log.warning("no API keys configured: using the key in %s", path)
    return dataclasses.replace(settings, api_keys=(key,))


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def key_is_valid(token: str | None, settings: Settings) -> bool:
    return principal_of(token, settings) is not None
