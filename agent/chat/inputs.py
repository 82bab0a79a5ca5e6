"""Turn OpenAI chat messages into the text conversation the LLM reads.

Audio parts are decoded and transcribed (all of a request's parts at once, off the event
loop); an assistant message that refers to earlier audio by id is replaced by that audio's
transcript from the store. Roles are normalised to what chat templates know.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import Any

from agent.audio import decode_audio
from agent.config import Settings
from agent.errors import AudioError, InvalidRequestError
from agent.runtime import Runtime

AUDIO_KIND = "chat_audio"
ASR_RATE = 16000


@dataclass
class PreparedConversation:
    messages: list[dict[str, Any]]
    audio_seconds: float       # input audio the request carried
    transcribed_chars: int     # of the text the LLM sees, how much came from audio


async def prepare_conversation(messages: list[dict[str, Any]], runtime: Runtime,
                               language: str | None = None) -> PreparedConversation:
    jobs: dict[tuple[int, int], asyncio.Task[tuple[str, float]]] = {}
    async with asyncio.TaskGroup() as group:
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if part.get("type") == "input_audio":
                    jobs[(i, j)] = group.create_task(
                        _transcribe_part(part["input_audio"], f"messages[{i}].content[{j}]",
                                         runtime, language))
    out: list[dict[str, Any]] = []
    seconds = 0.0
    from_audio = 0
    for i, message in enumerate(messages):
        role = message["role"]
        converted = dict(message)
        converted["role"] = "system" if role == "developer" else role
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                if (i, j) in jobs:
                    text, duration = jobs[(i, j)].result()
                    seconds += duration
                    from_audio += len(text)
                    pieces.append(text)
                elif part.get("type") in ("text", "refusal"):
                    pieces.append(part.get("text") or part.get("refusal") or "")
            converted["content"] = "\n".join(p for p in pieces if p)
        elif role == "assistant" and content is None and message.get("audio"):
            converted["content"] = await _earlier_audio(message["audio"]["id"], i, runtime)
        converted.pop("audio", None)
        if converted.get("content") is None:
            converted["content"] = ""
        out.append(converted)
    return PreparedConversation(out, seconds, from_audio)


async def _transcribe_part(part: dict[str, Any], where: str, runtime: Runtime,
                           language: str | None) -> tuple[str, float]:
    settings: Settings = runtime.settings
    try:
        data = base64.b64decode(part["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("input_audio.data is not valid base64.",
                                  param=f"{where}.input_audio.data",
                                  code="invalid_base64") from None
    fmt = part["format"]
    try:
        pcm = await asyncio.to_thread(
            decode_audio, data, fmt, rate=ASR_RATE,
            max_seconds=settings.max_audio_seconds, max_bytes=settings.max_audio_bytes)
    except AudioError as exc:
        raise AudioError(exc.message, param=f"{where}.input_audio") from exc
    asr = await runtime.asr()
    transcript = await asr.transcribe_async(pcm, language=language, words=False)
    return transcript.text.strip(), len(pcm) / ASR_RATE


async def _earlier_audio(audio_id: str, index: int, runtime: Runtime) -> str:
    record = await runtime.store.get_json(AUDIO_KIND, audio_id)
    if record is None:
        raise InvalidRequestError(
            f"Audio with id '{audio_id}' is unknown or has expired.",
            param=f"messages[{index}].audio.id", code="invalid_audio_id")
    return record["transcript"]
