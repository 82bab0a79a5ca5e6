"""POST /v1/audio/transcriptions: a multipart upload to text, JSON, SRT, VTT or verbose JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from agent.audio import decode_audio
from agent.errors import AudioError, InvalidRequestError
from agent.front.body import PayloadTooLarge, body_limit
from agent.model_ids import resolve_model
from agent.request_validation import validate
from agent.runtime import Runtime
from agent.speech.transcript import Transcript

SCHEMA = "openai/transcription_request"
RATE = 16000


async def create_transcription(request: Request) -> Response:
    fields, upload = await _read_form(request)
    validate(SCHEMA, fields)
    runtime: Runtime = request.app.state.runtime
    resolve_model(fields["model"], runtime.settings, "transcription")
    fmt = fields.get("response_format", "json")
    granularities = fields.get("timestamp_granularities[]", [])
    if granularities and fmt != "verbose_json":
        raise InvalidRequestError("timestamp_granularities requires response_format "
                                  "verbose_json.", param="timestamp_granularities",
                                  code="invalid_value")
    if fields.get("temperature", 0) != 0:
        raise InvalidRequestError("Parley decodes transcriptions greedily; only temperature "
                                  "0 is supported.", param="temperature",
                                  code="unsupported_value")
    data = await upload.read()
    settings = runtime.settings
    try:
        pcm = await asyncio.to_thread(decode_audio, data, None, rate=RATE,
                                      max_seconds=settings.max_audio_seconds,
                                      max_bytes=settings.max_audio_bytes)
    except AudioError as exc:
        raise AudioError(exc.message, param="file") from exc
    asr = await runtime.asr()
    words = fmt == "verbose_json" and "word" in granularities
    language = fields.get("language")
    transcript = await asr.transcribe_async(pcm, language=language, words=words,
                                            **_prompt(fields))
    if fields.get("stream"):
        return StreamingResponse(_sse(transcript), media_type="text/event-stream")
    return _render(transcript, fmt, granularities)


def _prompt(fields: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": fields["prompt"]} if fields.get("prompt") else {}


async def _read_form(request: Request) -> tuple[dict[str, Any], UploadFile]:
    limit = body_limit(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("Send the audio as multipart/form-data with a 'file' field.",
                                  param="file", code="invalid_request_body")
    form = await request.form(max_files=1, max_fields=32)
    fields: dict[str, Any] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file":
                raise InvalidRequestError(f"Unknown file field: '{key}'.", param=key,
                                          code="unknown_parameter")
            upload = value
        elif key.endswith("[]"):
            fields.setdefault(key, []).append(value)
        else:
            fields[key] = _coerce(key, value)
    if upload is None:
        raise InvalidRequestError("Missing required parameter: 'file'.", param="file",
                                  code="missing_required_parameter")
    return fields, upload


def _coerce(key: str, value: str) -> Any:
    if key == "temperature":
        try:
            return float(value)
        except ValueError:
            return value  # the schema names it
    if key == "stream":
        return {"true": True, "false": False}.get(value.lower(), value)
    return value


def _render(t: Transcript, fmt: str, granularities: list[str]) -> Response:
    if fmt == "text":
        return PlainTextResponse(t.text.strip() + "\n")
    if fmt == "srt":
        return PlainTextResponse(_subtitles(t, srt=True), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(_subtitles(t, srt=False), media_type="text/vtt")
    usage = {"type": "duration", "seconds": round(t.duration, 3)}
    if fmt == "json":
        return JSONResponse({"text": t.text.strip(), "usage": usage})
    body: dict[str, Any] = {"task": "transcribe", "language": t.language,
                            "duration": round(t.duration, 3), "text": t.text.strip(),
                            "usage": usage}
    if not granularities or "segment" in granularities:
        body["segments"] = [_segment(i, s) for i, s in enumerate(t.segments)]
    if "word" in granularities:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3),
                          "end": round(w.end, 3)} for w in t.words]
    return JSONResponse(body)


def _segment(index: int, s: Any) -> dict[str, Any]:
    return {"id": index, "seek": getattr(s, "seek", 0), "start": round(s.start, 3),
            "end": round(s.end, 3), "text": s.text, "tokens": list(getattr(s, "tokens", ())),
            "temperature": getattr(s, "temperature", 0.0),
            "avg_logprob": getattr(s, "avg_logprob", 0.0),
            "compression_ratio": getattr(s, "compression_ratio", 0.0),
            "no_speech_prob": getattr(s, "no_speech_prob", 0.0)}


def _timestamp(seconds: float, srt: bool) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{',' if srt else '.'}{ms:03d}"


def _subtitles(t: Transcript, srt: bool) -> str:
    cues = []
    for i, seg in enumerate(t.segments, start=1):
        span = f"{_timestamp(seg.start, srt)} --> {_timestamp(seg.end, srt)}"
        cue = f"{span}\n{seg.text.strip()}\n"
        cues.append(f"{i}\n{cue}" if srt else cue)
    return "\n".join(cues) if srt else "WEBVTT\n\n" + "\n".join(cues)


async def _sse(t: Transcript) -> AsyncIterator[bytes]:
    for seg in t.segments:
        yield _event({"type": "transcript.text.delta", "delta": seg.text})
    seconds = round(t.duration, 3)
    yield _event({"type": "transcript.text.done", "text": t.text.strip(),
                  "usage": {"type": "duration", "seconds": seconds}})


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
