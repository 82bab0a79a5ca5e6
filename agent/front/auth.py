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

from agent.api_keys import ENDPOINTS, KeyScope, bearer_token, principal_of, scope_of
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
        principal = principal_of(token, self.settings)
        if principal is not None:
            # Downstream, the request acts as the principal: never the key itself when it
            # is a hashed one (agent.api_keys).
            scope.setdefault("state", {})["api_key"] = principal
            key_scope = scope_of(principal, self.settings)
            if key_scope is not None and not key_scope.allows(ENDPOINTS.get(scope["path"])):
                await _refuse(send, 403, "This API key may not use this endpoint "
                              f"({ENDPOINTS.get(scope['path'])}): it is outside its scopes.",
                              "insufficient_permissions", "invalid_request_error")
                return
            await self._within_limits(principal, key_scope, scope, receive, send)
            return
        if token is None:
            message = ("You didn't provide an API key. Provide it in an Authorization header "
                       "(Authorization: Bearer YOUR_KEY).")
        else:
            message = "Incorrect API key provided."
        await _refuse(send, 401, message, "invalid_api_key", "invalid_request_error",
                      [(b"www-authenticate", b'Bearer realm="parley"')])

    async def _within_limits(self, principal: str, key_scope: KeyScope | None, scope: Scope,
                             receive: Receive, send: Send) -> None:
        """The key's request limit (agent.limits), shared by every replica: a 429 with
        Retry-After past it; OpenAI's x-ratelimit-* headers on every answer."""
        state = getattr(scope.get("app"), "state", None)
        limits = getattr(state, "limits", None)
        limit = None if key_scope is None else key_scope.requests_per_minute
        verdict = None if limits is None else \
            await limits.take_request(key_fingerprint(principal), limit)
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
            await _refuse(send, 429, message, "rate_limit_exceeded", "requests",
                          [(b"retry-after", str(wait).encode()), *headers])
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_limits)


async def _refuse(send: Send, status: int, message: str, code: str, kind: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An error answer in OpenAI's shape, with `headers` beside the content type."""
    body = json.dumps(error_object(message, kind, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
