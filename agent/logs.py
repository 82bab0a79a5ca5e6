"""Logging: plain text for a terminal, one JSON object per line for a log pipeline.

`log_format = "json"` (PARLEY_LOG_FORMAT) writes every record, uvicorn's access lines
included, as {"time", "level", "logger", "message", ...} with the ids of what it happened
in: `request_id` (an HTTP request, also sent back as `x-request-id`), `session_id` and
`conversation_id` (a realtime session, a phone call). Fields a caller passes as
`extra={"fields": {...}}` are merged in: the realtime session logs one line per answered
turn with its stage timings that way.

Nothing secret or bulky reaches a line, whatever the caller wrote: API keys (`sk-…`),
client secrets (`ek_…`), bearer tokens and long base64 runs (audio) are cut out of the
message and of the fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id",
                                                                        default=None)
conversation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "conversation_id", default=None)
_IDS = (("request_id", request_id), ("session_id", session_id),
        ("conversation_id", conversation_id))

_SECRETS = re.compile(r"\b(sk-|ek_|Bearer\s+)[A-Za-z0-9_\-.]{4,}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


def scrub(text: str) -> str:
    """`text` without credentials or long base64 (audio) in it."""
    text = _SECRETS.sub(lambda m: m.group(1) + "[redacted]", text)
    return _BASE64_RUN.sub(lambda m: f"[{len(m.group(0))} base64 characters]", text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for name, var in _IDS:
            if (value := var.get()) is not None:
                line[name] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(_scrub_value(fields))
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = scrub(super().format(record))
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in _scrub_value(fields).items())
        return text


def configure(level: str, fmt: str) -> None:
    """Route every logger (uvicorn's too) through one handler on stderr."""
    if fmt not in ("text", "json"):
        from agent.errors import ConfigError

        raise ConfigError(f"setting 'log_format' must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestIdMiddleware:
    """Gives each HTTP request an id (the client's `X-Request-Id` when it sends a sane
    one), in the log context and in the `x-request-id` response header, as OpenAI's."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        ident = given if re.fullmatch(r"[A-Za-z0-9_\-.]{1,128}", given) else new_request_id()
        token = request_id.set(ident)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", ident.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
