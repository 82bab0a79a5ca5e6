"""POST /v1/realtime/client_secrets (GA) and POST /v1/realtime/sessions (beta): ephemeral
client secrets a browser uses to open a Realtime WebSocket (agent.realtime.credentials).

The API key middleware has already checked the caller's key; the secret records which key
made it, so a session opened with it acts as that key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.front.body import read_json
from agent.realtime.credentials import create_beta_session, create_client_secret


def _issuer(create: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[..., Any]:
    """An endpoint that reads the JSON body and answers with what `create` makes of it."""

    async def endpoint(request: Request) -> JSONResponse:
        body = await read_json(request)
        state = request.app.state
        return JSONResponse(await create(body, state.settings, state.store,
                                         getattr(request.state, "api_key", None)))

    return endpoint


ROUTES = [
    Route("/v1/realtime/client_secrets", _issuer(create_client_secret), methods=["POST"]),
    Route("/v1/realtime/sessions", _issuer(create_beta_session), methods=["POST"]),
]
