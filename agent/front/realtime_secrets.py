"""POST /v1/realtime/client_secrets (GA) and POST /v1/realtime/sessions (beta): ephemeral
client secrets a browser uses to open a Realtime WebSocket (agent.realtime.credentials).

The API key middleware has already checked the caller's key; the secret records which key
made it, so a session opened with it acts as that key.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.front.body import read_json
from agent.realtime.credentials import create_beta_session, create_client_secret


async def create_realtime_client_secret(request: Request) -> JSONResponse:
    body = await read_json(request)
    state = request.app.state
    secret = await create_client_secret(body, state.settings, state.store,
                                        getattr(request.state, "api_key", None))
    return JSONResponse(secret)


async def create_realtime_beta_session(request: Request) -> JSONResponse:
    body = await read_json(request)
    state = request.app.state
    session = await create_beta_session(body, state.settings, state.store,
                                        getattr(request.state, "api_key", None))
    return JSONResponse(session)


ROUTES = [
    Route("/v1/realtime/client_secrets", create_realtime_client_secret, methods=["POST"]),
    Route("/v1/realtime/sessions", create_realtime_beta_session, methods=["POST"]),
]
