"""OpenAI's response shapes for chat completions: the whole reply, and SSE chunks."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent import __version__
from agent.chat.pipeline import (
    AudioData,
    ChoiceDone,
    Event,
    TextDelta,
    ToolCallDelta,
    audio_tokens,
)
from agent.chat.request import ChatRequest
from agent.config import Settings

FINGERPRINT = f"fp_parley_{__version__}"


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage_block(done: list[ChoiceDone], input_audio_seconds: float,
                settings: Settings) -> dict[str, Any]:
    """Usage by Parley's documented rule (README, "Usage and cost")."""
    first = done[0]
    audio_in = audio_tokens(input_audio_seconds)
    text_in = first.prompt_tokens
    text_out = sum(d.completion_tokens for d in done)
    audio_out = sum(audio_tokens(d.audio_seconds) for d in done)
    prompt, completion = text_in + audio_in, text_out + audio_out
    cost_in = prompt * settings.price_input_per_million / 1e6
    cost_out = completion * settings.price_output_per_million / 1e6
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"audio_tokens": audio_in, "text_tokens": text_in,
                                  "cached_tokens": first.cached_tokens, "image_tokens": 0},
        "completion_tokens_details": {"audio_tokens": audio_out, "text_tokens": text_out,
                                      "reasoning_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
        "estimated_cost_usd": {"input": round(cost_in, 8), "output": round(cost_out, 8),
                               "total": round(cost_in + cost_out, 8)},
    }


def completion_body(request: ChatRequest, completion_id: str, created: int,
                    done: list[ChoiceDone], audio: dict[int, bytes], expires_at: int,
                    input_audio_seconds: float, settings: Settings) -> dict[str, Any]:
    choices = []
    for d in sorted(done, key=lambda d: d.choice):
        message: dict[str, Any] = {"role": "assistant", "content": d.text, "refusal": None,
                                   "annotations": []}
        if request.audio is not None:
            message["content"] = None
            message["audio"] = {"id": d.audio_id,
                                "data": base64.b64encode(audio.get(d.choice, b"")).decode(),
                                "expires_at": expires_at, "transcript": d.text}
        if d.tool_calls:
            _with_calls(message, d, request.legacy_functions)
        choices.append({"index": d.choice, "message": message, "logprobs": None,
                        "finish_reason": d.finish_reason})
    return {
        "id": completion_id, "object": "chat.completion", "created": created,
        "model": request.model.id, "system_fingerprint": FINGERPRINT,
        "service_tier": "default", "choices": choices,
        "usage": usage_block(done, input_audio_seconds, settings),
    }


def _with_calls(message: dict[str, Any], done: ChoiceDone, legacy: bool) -> None:
    """A tool-call reply: content is the text before the calls, or null; no audio (a call
    is for the client's code, not for the listener)."""
    message["content"] = done.text or None
    message.pop("audio", None)
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in done.tool_calls]
    if legacy:
        message["function_call"] = calls[0]["function"]
    else:
        message["tool_calls"] = calls


@dataclass
class ChunkWriter:
    """Builds the SSE chunks of one streamed completion, in OpenAI's order per choice:
    the role delta, transcript or content deltas with audio data interleaved, the final
    audio update carrying only `expires_at`, an empty delta with `finish_reason`, then
    (with include_usage) a usage chunk whose `choices` is empty."""

    request: ChatRequest
    completion_id: str
    created: int
    audio_ids: list[str]
    expires_at: int
    started: set[int] = field(default_factory=set)
    # Audio bytes not yet sent: base64 of 3-byte groups concatenates cleanly, so clients
    # that join the `data` strings before decoding get the same bytes as those that don't.
    pending: dict[int, bytes] = field(default_factory=dict)
    audio_started: set[int] = field(default_factory=set)

    def _chunk(self, choice: int, delta: dict[str, Any], finish: str | None = None
               ) -> dict[str, Any]:
        body = {"id": self.completion_id, "object": "chat.completion.chunk",
                "created": self.created, "model": self.request.model.id,
                "system_fingerprint": FINGERPRINT, "service_tier": "default",
                "choices": [{"index": choice, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}
        if self.request.include_usage:
            body["usage"] = None
        return body

    def _audio(self, choice: int, fields: dict[str, Any]) -> dict[str, Any]:
        if choice not in self.audio_started:
            self.audio_started.add(choice)
            fields = {"id": self.audio_ids[choice], **fields}
        return self._chunk(choice, {"audio": fields})

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        out = []
        if event.choice not in self.started:
            self.started.add(event.choice)
            first = {"role": "assistant", "content": None if self.request.audio else "",
                     "refusal": None}
            out.append(self._chunk(event.choice, first))
        if isinstance(event, TextDelta):
            if self.request.audio:
                out.append(self._audio(event.choice, {"transcript": event.text}))
            else:
                out.append(self._chunk(event.choice, {"content": event.text}))
        elif isinstance(event, ToolCallDelta):
            out.append(self._chunk(event.choice, self._call_delta(event)))
        elif isinstance(event, AudioData):
            buffered = self.pending.get(event.choice, b"") + event.data
            whole = len(buffered) - len(buffered) % 3
            self.pending[event.choice] = buffered[whole:]
            if whole:
                data = base64.b64encode(buffered[:whole]).decode()
                out.append(self._audio(event.choice, {"data": data}))
        elif isinstance(event, ChoiceDone):
            if self.request.audio:
                if rest := self.pending.pop(event.choice, b""):
                    out.append(self._audio(event.choice,
                                           {"data": base64.b64encode(rest).decode()}))
                out.append(self._audio(event.choice, {"expires_at": self.expires_at}))
            out.append(self._chunk(event.choice, {}, event.finish_reason))
        return out

    def _call_delta(self, event: ToolCallDelta) -> dict[str, Any]:
        f = event.fragment
        function: dict[str, Any] = {"arguments": f.arguments}
        if f.name is not None:
            function = {"name": f.name, "arguments": f.arguments}
        if self.request.legacy_functions:
            return {"function_call": function}
        call: dict[str, Any] = {"index": f.index, "function": function}
        if f.id is not None:
            call = {"index": f.index, "id": f.id, "type": "function", "function": function}
        return {"tool_calls": [call]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.completion_id, "object": "chat.completion.chunk",
                "created": self.created, "model": self.request.model.id,
                "system_fingerprint": FINGERPRINT, "service_tier": "default",
                "choices": [], "usage": usage}


def now() -> int:
    return int(time.time())
