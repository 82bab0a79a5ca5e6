"""POST /v1/chat/completions: validate, run the chat pipeline, answer as JSON or SSE."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from agent.chat.inputs import AUDIO_KIND, prepare_conversation
from agent.chat.pipeline import AudioData, ChoiceDone, Event, plan_completion, run_completion
from agent.chat.request import ChatRequest, parse_chat_request
from agent.chat.response import (
    ChunkWriter,
    completion_body,
    new_completion_id,
    now,
    usage_block,
)
from agent.chat.server_tools import (
    ToolsRan,
    plan_first_round,
    run_with_server_tools,
    server_tools_for,
)
from agent.errors import ParleyError, client_error
from agent.front.body import read_json
from agent.request_validation import validate
from agent.runtime import Runtime

SCHEMA = "openai/chat_completion_request"
log = logging.getLogger(__name__)


async def chat_completions(request: Request) -> Response:
    body = await read_json(request)
    validate(SCHEMA, body)
    runtime: Runtime = request.app.state.runtime
    tts = await runtime.tts() if body.get("modalities") and "audio" in body["modalities"] \
        else None
    voices = tts.voice_names if tts else ()
    chat = parse_chat_request(body, runtime.settings, voices)
    conversation = await prepare_conversation(chat.messages, runtime)
    server = await server_tools_for(body, chat, runtime, getattr(request.state, "api_key", None))
    if server is None:
        plan = await plan_completion(chat, conversation.messages, runtime)

        def events(streaming: bool, audio_ids: list[str]) -> AsyncIterator[Event | ToolsRan]:
            return run_completion(plan, streaming=streaming, audio_ids=audio_ids)
    else:
        first = await plan_first_round(chat, conversation.messages, runtime, server)

        def events(streaming: bool, audio_ids: list[str]) -> AsyncIterator[Event | ToolsRan]:
            return run_with_server_tools(first, conversation.messages, runtime, server,
                                         streaming=streaming, audio_ids=audio_ids)
    if chat.stream:
        return StreamingResponse(_sse(chat, events, conversation.audio_seconds, runtime),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache",
                                          "x-accel-buffering": "no"})
    return JSONResponse(await _complete(chat, events, conversation.audio_seconds, runtime))


# The events of one completion: (streaming, audio ids) -> events, with ToolsRan when the
# server ran tools itself.
Events = Callable[[bool, list[str]], AsyncIterator[Event | ToolsRan]]


async def _complete(chat: ChatRequest, events: Events, audio_seconds: float,
                    runtime: Runtime) -> dict[str, Any]:
    created = now()
    done: list[ChoiceDone] = []
    audio: dict[int, bytes] = {}
    added: list[dict[str, Any]] = []
    audio_ids = [f"audio_{uuid.uuid4().hex}" for _ in range(chat.n)]
    async for event in events(False, audio_ids):
        if isinstance(event, AudioData):
            audio[event.choice] = audio.get(event.choice, b"") + event.data
        elif isinstance(event, ChoiceDone):
            done.append(event)
        elif isinstance(event, ToolsRan):
            added += event.messages
    expires_at = created + runtime.settings.audio_ttl_s
    await _remember_audio(chat, done, expires_at, runtime)
    body = completion_body(chat, new_completion_id(), created, done, audio, expires_at,
                           audio_seconds, runtime.settings)
    if added:
        body["parley"] = {"tool_messages": added}
    return body


async def _remember_audio(chat: ChatRequest, done: list[ChoiceDone], expires_at: int,
                          runtime: Runtime) -> None:
    """Keep what each reply said, so a later turn can refer to its audio by id."""
    if chat.audio is None:
        return
    for d in done:
        await runtime.store.put_json(AUDIO_KIND, d.audio_id or "", {
            "transcript": d.text, "format": chat.audio.format, "expires_at": expires_at,
        }, ttl_s=runtime.settings.audio_ttl_s)


async def _sse(chat: ChatRequest, events: Events, audio_seconds: float,
               runtime: Runtime) -> AsyncIterator[bytes]:
    created = now()
    expires_at = created + runtime.settings.audio_ttl_s
    audio_ids = [f"audio_{uuid.uuid4().hex}" for _ in range(chat.n)]
    writer = ChunkWriter(chat, new_completion_id(), created, audio_ids, expires_at)
    done: list[ChoiceDone] = []
    added: list[dict[str, Any]] = []
    try:
        async for event in events(True, audio_ids):
            if isinstance(event, ToolsRan):
                added += event.messages
                continue
            chunks = writer.chunks(event)
            if isinstance(event, ChoiceDone):
                done.append(event)
                await _remember_audio(chat, [event], expires_at, runtime)
                if added:  # on the finish chunk: a chunk without choices trips clients
                    chunks[-1]["parley"] = {"tool_messages": added}
            for chunk in chunks:
                yield _event(chunk)
    except Exception as exc:
        # Headers are gone already: the error travels in the stream, as OpenAI's does.
        known = client_error(exc)
        if known is None:
            log.exception("chat stream failed")
            known = ParleyError("internal server error")
        yield _event(known.to_dict())
        yield b"data: [DONE]\n\n"
        return
    if chat.include_usage and done:
        yield _event(writer.usage_chunk(usage_block(done, audio_seconds, runtime.settings)))
    yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_response(exc: ParleyError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status)
