"""GET /v1/realtime (WebSocket): authenticate, open or resume a conversation, and pump
client events into the session and the session's events out to the client.

Query parameters: `model` (any realtime or chat id Parley answers to), and Parley's
`conversation_id`, which resumes a conversation kept in the store — from any replica —
after a dropped connection. The conversation id is in `conversation.created`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from agent import logs
from agent.api_keys import scope_of
from agent.errors import ParleyError
from agent.lifecycle import CLOSE_RESTART, Lifecycle, shutting_down_message
from agent.limits import SESSION_RENEW_S, Limits
from agent.model_ids import resolve_model
from agent.realtime.conversation import Conversation
from agent.realtime.credentials import Credentials, CredentialsError, authenticate_websocket
from agent.realtime.protocol import (
    RealtimeError,
    new_conversation_id,
    new_session_id,
    server_event,
)
from agent.realtime.session import Session
from agent.realtime.session_config import apply_update, default_session
from agent.runtime import Runtime

log = logging.getLogger(__name__)
DEFAULT_MODEL = "gpt-realtime"
CLOSE_REQUEST = 4000     # the connection's parameters are wrong
CLOSE_TIME = 4002        # idle too long, or the session reached its maximum length
CLOSE_POLICY = 1008      # a limit of the API key: too many sessions open
SHUTTING_DOWN = "server_shutting_down"


async def realtime_endpoint(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    try:
        credentials = await authenticate_websocket(websocket.scope, runtime.settings,
                                                   runtime.store)
    except CredentialsError as exc:
        # Browsers drop a handshake that selects none of their subprotocols, and then
        # never see why: accept with theirs, say why, close as OpenAI does.
        await _refuse(websocket, exc, exc.close_code, exc.subprotocol, exc.close_reason)
        return
    lifecycle: Lifecycle = websocket.app.state.lifecycle
    if lifecycle.draining:
        await _refuse(websocket, RealtimeError(shutting_down_message(), code=SHUTTING_DOWN,
                                               type="server_error"),
                      CLOSE_RESTART, credentials.subprotocol)
        return
    limits: Limits = websocket.app.state.limits
    claim = new_session_id()
    key_scope = scope_of(credentials.api_key, runtime.settings)
    most = None if key_scope is None else key_scope.max_sessions
    slot = await limits.open_session(credentials.key_id, claim, most)
    if slot is not None and not slot.allowed:
        await _refuse(websocket, RealtimeError(
            f"Rate limit reached for realtime sessions on this API key: {slot.limit} open at "
            "once. Close one, or try again later.", code="rate_limit_exceeded",
            type="requests"), CLOSE_POLICY, credentials.subprotocol)
        return
    keeper = asyncio.create_task(_keep_claim(limits, credentials.key_id, claim, most)) \
        if slot is not None else None
    try:
        await _serve_session(websocket, runtime, credentials, lifecycle)
    finally:
        if keeper is not None:
            keeper.cancel()
            await limits.close_session(credentials.key_id, claim)


async def _keep_claim(limits: Limits, key_id: str, claim: str, most: int | None) -> None:
    """Renew the session's slot while it lives; a replica that dies lets it lapse."""
    while True:
        await asyncio.sleep(SESSION_RENEW_S)
        await limits.renew_session(key_id, claim, most)


async def _serve_session(websocket: WebSocket, runtime: Runtime, credentials: Credentials,
                         lifecycle: Lifecycle) -> None:
    try:
        session = await _open_session(websocket, runtime, credentials)
    except (RealtimeError, ParleyError) as exc:
        error = exc if isinstance(exc, RealtimeError) else RealtimeError(
            str(exc), code=getattr(exc, "code", None) or "invalid_request", param=exc.param)
        await _refuse(websocket, error, CLOSE_REQUEST, credentials.subprotocol)
        return
    await websocket.accept(subprotocol=credentials.subprotocol)
    # Every line logged from here on, in this task and those it starts, names the session.
    logs.session_id.set(session.id)
    logs.conversation_id.set(session.conversation.id)
    writer = asyncio.create_task(_write(websocket, session))
    handle = lifecycle.session_opened(
        lambda deadline: _wind_up(websocket, session, writer, deadline))
    try:
        await session.start()
        await _read(websocket, session, runtime)
    except WebSocketDisconnect:
        pass
    finally:
        session.outbox.close()  # the connection is gone: nothing may wait on it now
        await session.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        await lifecycle.session_closed(handle)


async def _wind_up(websocket: WebSocket, session: Session, writer: asyncio.Task[None],
                   deadline: float) -> None:
    """The server drains: finish the response in progress, say where to reconnect, let
    the writer flush, close with 1012. The conversation is in the store already."""
    await session.wind_up(deadline)
    conversation_id = session.conversation.id
    await session.send(RealtimeError(shutting_down_message(conversation_id),
                                     code=SHUTTING_DOWN, type="server_error").to_event())
    session.outbox.finish()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(writer), max(deadline - time.monotonic(), 0.1))
    with contextlib.suppress(Exception):
        await websocket.close(CLOSE_RESTART, f"reconnect with conversation_id={conversation_id}")


async def _open_session(websocket: WebSocket, runtime: Runtime, credentials) -> Session:
    settings = runtime.settings
    # A client secret fixes the model it was made for; the SDK always sends `model` too.
    model = (credentials.session or {}).get("model") or websocket.query_params.get("model") \
        or DEFAULT_MODEL
    served = resolve_model(model, settings, "chat")  # an unknown id is refused before accepting
    config = default_session(settings, model)
    if credentials.session:
        config = apply_update(config, credentials.session)
    ttl = settings.realtime_state_ttl_s
    if resume := websocket.query_params.get("conversation_id"):
        conversation = await Conversation.resume(resume, runtime.store, ttl)
        if conversation.session:
            config = apply_update(config, conversation.session)
    else:
        conversation = Conversation(new_conversation_id(), runtime.store, ttl)
    vad, asr, dispatcher = await asyncio.gather(runtime.vad(), runtime.asr(),
                                                runtime.dispatcher())
    await runtime.scheduler(served.target)
    if config.audio_output:
        await runtime.tts()
    return Session(runtime, config, conversation, beta=credentials.beta,
                   api_key=credentials.api_key, vad_model=vad, asr=asr, dispatcher=dispatcher)


async def _read(websocket: WebSocket, session: Session, runtime: Runtime) -> None:
    settings = runtime.settings
    deadline = time.monotonic() + settings.realtime_max_session_s
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(websocket.receive(),
                                             min(settings.realtime_idle_timeout_s, left))
        except TimeoutError:
            why = "the session reached its maximum length" if time.monotonic() >= deadline \
                else "the client sent nothing for too long"
            await session.send(server_event("error", error={
                "type": "invalid_request_error", "code": "session_expired",
                "message": f"Closing: {why}.", "param": None, "event_id": None}))
            session.outbox.finish()  # the writer flushes, then stops
            await asyncio.sleep(0.2)
            await websocket.close(CLOSE_TIME)
            return
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") if message.get("text") is not None else message.get("bytes")
        if raw is not None:
            await session.handle(raw)


async def _write(websocket: WebSocket, session: Session) -> None:
    while (event := await session.outbox.get()) is not None:
        try:
            await websocket.send_text(json.dumps(event, separators=(",", ":")))
        except (WebSocketDisconnect, RuntimeError):
            session.outbox.close()  # the client is gone: release whoever waits to send
            return


async def _refuse(websocket: WebSocket, error: RealtimeError, code: int,
                  subprotocol: str | None = None, reason: str | None = None) -> None:
    """Accept only to say why, as OpenAI does: an `error` event, then the close."""
    await websocket.accept(subprotocol=subprotocol)
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps(error.to_event()))
        await websocket.close(code, reason)
