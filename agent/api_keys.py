"""API keys: the key a server runs with, and checking the one a client presents.

Keys come from settings (`PARLEY_API_KEYS` or the TOML file) and arrive as
`Authorization: Bearer <key>` (HTTP: front/auth.py) or in a WebSocket's subprotocols
(realtime/credentials.py); both check them here.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import secrets

from agent.config import Settings

KEY_FILE = "api_key"

log = logging.getLogger(__name__)


def with_api_keys(settings: Settings) -> Settings:
    """Settings with at least one key, unless auth is explicitly off.

    With no key configured, Parley makes one on first start and keeps it in the cache
    folder (mode 0600), so a fresh install is never an open server by accident.
    """
    if settings.api_keys or settings.auth_disabled:
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
    if token is None:
        return False
    # Compare against every key in constant time so timing reveals nothing.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys]
    return any(matches)
