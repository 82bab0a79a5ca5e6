"""API-key authentication as a plain ASGI middleware.

Keys come from settings (`PARLEY_API_KEYS` or the TOML file) and arrive as
`Authorization: Bearer <key>`. Browsers cannot set headers on a WebSocket, so the realtime
route also accepts the key (or an ephemeral client secret) in the subprotocol list; that
check belongs to the realtime front and is skipped here for WebSocket scopes that carry one.
"""

from __future__ import annotations

import json
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.api_keys import bearer_token, key_is_valid
from agent.config import Settings
from agent.dispatch.types import key_fingerprint
from agent.errors import error_object

# /twilio/voice proves itself with Twilio's signature instead (agent.phone.webhook); the
# widget's script and demo page are public, and its demo secrets guard themselves
# (agent.front.widget).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/twilio/voice"})
OPEN_PREFIXES = ("/static/", "/widget")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.settings.auth_disabled
                or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if key_is_valid(token, self.settings):
            scope.setdefault("state", {})["api_key"] = token
            await self._within_limits(token, scope, receive, send)
            return
        if token is None:
            message = ("You didn't provide an API key. Provide it in an Authorization header "
                       "(Authorization: Bearer YOUR_KEY).")
        else:
            message = "Incorrect API key provided."
        body = json.dumps(error_object(message, "invalid_request_error",
                                       code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b'Bearer realm="parley"')]})
        await send({"type": "http.response.body", "body": body})

    async def _within_limits(self, token: str | None, scope: Scope, receive: Receive,
                             send: Send) -> None:
        """The key's request limit (agent.limits), shared by every replica: a 429 with
        Retry-After past it; OpenAI's x-ratelimit-* headers on every answer."""
        state = getattr(scope.get("app"), "state", None)
        limits = getattr(state, "limits", None)
        verdict = None if limits is None else \
            await limits.take_request(key_fingerprint(token))
        if verdict is None:
            await self.app(scope, receive, send)
            return
        headers = [(b"x-ratelimit-limit-requests", str(verdict.limit).encode()),
                   (b"x-ratelimit-remaining-requests", str(verdict.remaining).encode()),
                   (b"x-ratelimit-reset-requests", f"{verdict.reset_s:.3f}s".encode())]
        if not verdict.allowed:
            wait = max(1, math.ceil(verdict.retry_after_s))
            message = (f"Rate limit reached for requests on this API key: "
                       f"{verdict.limit} per minute. Please try again in {wait}s.")
            body = json.dumps(error_object(message, "requests",
                                           code="rate_limit_exceeded")).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(wait).encode()), *headers]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_limits)
