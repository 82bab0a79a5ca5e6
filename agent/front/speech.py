"""POST /v1/audio/speech: text to audio bytes, streamed as each clause is synthesised."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agent.audio import StreamingEncoder, output_format
from agent.chat.pipeline import audio_tokens  # the usage rule (README)
from agent.errors import ParleyError, VoiceError
from agent.front.body import read_json
from agent.model_ids import resolve_model
from agent.request_validation import validate
from agent.runtime import Runtime

SCHEMA = "openai/speech_request"


async def create_speech(request: Request) -> Response:
    body = await read_json(request)
    validate(SCHEMA, body)
    runtime: Runtime = request.app.state.runtime
    resolve_model(body["model"], runtime.settings, "speech")
    tts = await runtime.tts()
    voice = body["voice"]["id"] if isinstance(body["voice"], dict) else body["voice"]
    if voice not in tts.voice_names:
        raise VoiceError(f"Unknown voice '{voice}'. Available voices: "
                         f"{', '.join(tts.voice_names)}.", param="voice")
    voice, speed = tts.check(voice, body.get("speed", 1.0))
    fmt = output_format(body.get("response_format", "mp3"))
    text = body["input"]
    if body.get("stream_format") == "sse":
        return StreamingResponse(_sse(tts, text, voice, speed, fmt.name),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    return StreamingResponse(_audio(tts, text, voice, speed, fmt.name), media_type=fmt.mime)


async def _encoded(tts, text: str, voice: str, speed: float, fmt: str
                   ) -> AsyncIterator[tuple[bytes, float]]:
    """(encoded bytes, seconds of speech in them) per clause, then the encoder's tail."""
    encoder: StreamingEncoder | None = None
    async for chunk in tts.stream(text, voice, speed):
        if not len(chunk.pcm):
            continue
        encoder = encoder or StreamingEncoder(fmt, chunk.rate)
        yield await asyncio.to_thread(encoder.feed, chunk.pcm), chunk.duration
    if encoder is not None:
        yield await asyncio.to_thread(encoder.close), 0.0


async def _audio(tts, text: str, voice: str, speed: float, fmt: str) -> AsyncIterator[bytes]:
    async for data, _ in _encoded(tts, text, voice, speed, fmt):
        if data:
            yield data


async def _sse(tts, text: str, voice: str, speed: float, fmt: str) -> AsyncIterator[bytes]:
    seconds = 0.0
    try:
        async for data, duration in _encoded(tts, text, voice, speed, fmt):
            seconds += duration
            if data:
                yield _event({"type": "speech.audio.delta",
                              "audio": base64.b64encode(data).decode()})
    except ParleyError as exc:
        yield _event({"type": "error", **exc.to_dict()})
        return
    input_tokens = len(text.split())
    output_tokens = audio_tokens(seconds)
    yield _event({"type": "speech.audio.done",
                  "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                            "total_tokens": input_tokens + output_tokens}})


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
