"""API-key authentication as a plain ASGI middleware.

Keys come from settings (`PARLEY_API_KEYS` or the TOML file) and arrive as
`Authorization: Bearer <key>`. Browsers cannot set headers on a WebSocket, so the realtime
route also accepts the key (or an ephemeral client secret) in the subprotocol list; that
check belongs to the realtime front and is skipped here for WebSocket scopes that carry one.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from agent.api_keys import bearer_token, key_is_valid
from agent.config import Settings
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
            await self.app(scope, receive, send)
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
