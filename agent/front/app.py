"""The ASGI application: routes, the lifespan that opens the state store, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from agent import __version__
from agent.api_keys import key_scopes, with_api_keys
from agent.assets import MODELS, resolve
from agent.config import Settings
from agent.errors import ModelMissingError, ParleyError, client_error, error_object
from agent.front.auth import APIKeyMiddleware
from agent.front.chat import chat_completions
from agent.front.openapi import openapi
from agent.front.realtime_secrets import ROUTES as REALTIME_SECRET_ROUTES
from agent.front.speech import create_speech
from agent.front.transcriptions import create_transcription
from agent.front.widget import ROUTES as WIDGET_ROUTES
from agent.front.widget import check_demo_mode
from agent.lifecycle import DrainMiddleware, Lifecycle
from agent.limits import Limits
from agent.logs import RequestIdMiddleware
from agent.model_ids import listed_models
from agent.phone.media import twilio_media
from agent.phone.webhook import twilio_voice
from agent.realtime.endpoint import realtime_endpoint
from agent.runtime import Runtime
from agent.state.store import Store

log = logging.getLogger("parley")


async def healthz(request: Request) -> JSONResponse:
    store: Store = request.app.state.store
    store_state: dict[str, object] = {"embedded": store.embedded}
    try:
        store_ok = await store.ping()
    except Exception as exc:  # a dead store is what this endpoint exists to report
        store_ok = False
        store_state["error"] = getattr(exc, "message", str(exc))
    body = {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "store": {"ok": store_ok, **store_state},
        "models": request.app.state.models,
        "decoder": request.app.state.runtime.decoder_stats(),
    }
    return JSONResponse(body, status_code=200 if store_ok else 503)


async def readyz(request: Request) -> JSONResponse:
    """The readiness probe: 503 from the moment a drain begins (agent.lifecycle)."""
    if request.app.state.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format; behind the API key like the API (a scraper sends it)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from agent.metrics import REGISTRY

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def parley_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ParleyError)
    return JSONResponse(exc.to_dict(), status_code=exc.status)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    body = error_object(str(exc.detail), kind, code=code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    if (known := client_error(exc)) is not None:  # raised inside a task group
        return JSONResponse(known.to_dict(), status_code=known.status)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = error_object("internal server error")
    return JSONResponse(body, status_code=500)


def check_models(settings: Settings) -> dict[str, str]:
    """Resolve (and on first start assemble) the models this configuration uses.

    Names are bundled models; anything else is a path the operator configured.
    """
    wanted = [settings.asr_model, "joe", "silero-vad", settings.llm_model]
    found: dict[str, str] = {}
    for name in wanted:
        if name in MODELS:
            found[name] = str(resolve(name, settings.cache_dir))
        elif Path(name).expanduser().exists():
            found[name] = str(Path(name).expanduser())
        else:
            raise ModelMissingError(f"model {name!r} is neither a bundled model nor a path")
    return found


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": listed_models(request.app.state.settings)})


def create_app(settings: Settings) -> Starlette:
    settings = with_api_keys(settings)
    check_demo_mode(settings)
    key_scopes(settings)  # a malformed [keys] table fails at start, not on a request

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        # Fail at start, in one line, if a default model is missing, not on the first request.
        app.state.models = await asyncio.to_thread(check_models, settings)
        app.state.store = await Store.open(settings)
        app.state.limits = Limits(app.state.store, settings)
        app.state.runtime = Runtime(settings, app.state.store)
        warming = asyncio.create_task(app.state.runtime.warm()) if settings.warm_start else None
        try:
            yield
        finally:
            if warming is not None and not warming.done():
                warming.cancel()
            await app.state.runtime.close()
            await app.state.store.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/audio/speech", create_speech, methods=["POST"]),
        Route("/v1/audio/transcriptions", create_transcription, methods=["POST"]),
        *REALTIME_SECRET_ROUTES,
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        Route("/twilio/voice", twilio_voice, methods=["POST"]),
        WebSocketRoute("/twilio/media", twilio_media),
        *WIDGET_ROUTES,
    ]
    lifecycle = Lifecycle()
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(RequestIdMiddleware),
                    Middleware(DrainMiddleware, lifecycle=lifecycle),
                    Middleware(APIKeyMiddleware, settings=settings)],
        exception_handlers={ParleyError: parley_error, HTTPException: http_error,
                            Exception: server_error},
    )
    app.state.lifecycle = lifecycle  # the server's SIGTERM handler drains through it
    return app
