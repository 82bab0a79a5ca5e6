"""One Realtime response: the conversation in, events out, until done or cancelled.

The chat pipeline does the work (agent.chat.pipeline: decoder with the session's KV cache,
the tool grammar, clause-level TTS, the streaming encoder); this module turns its flat
events into the Realtime event sequence:

    response.created ─ rate_limits.updated
    ├─ message item:  output_item.added ─ conversation.item.added ─ content_part.added
    │                 output_audio.delta / output_audio_transcript.delta (or output_text)
    │                 …done ─ content_part.done ─ output_item.done ─ conversation.item.done
    ├─ function_call item(s): output_item.added … function_call_arguments.delta/.done …
    └─ response.done (status, usage)

Cancelling the task (response.cancel, barge-in, disconnect) stops generation, synthesis
and sending together; the items are closed as `incomplete`, the assistant's transcript is
cut to the audio the listener can have heard, and response.done says `cancelled`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from agent.chat.pipeline import AudioData, ChoiceDone, TextDelta, ToolCallDelta, audio_tokens
from agent.realtime.conversation import Conversation, truncate_transcript
from agent.realtime.protocol import new_item_id, server_event
from agent.realtime.session_config import SessionConfig, to_response_object

log = logging.getLogger(__name__)
# Bytes per millisecond of each output format (mono): pcm16 at 24 kHz, G.711 at 8 kHz.
BYTES_PER_MS = {"pcm16": 48, "pcmu": 8, "pcma": 8}
WIND_DOWN_S = 5.0  # the most a cancelled response spends closing its items
DELTA_MS = 100  # 4,800 bytes of pcm16: a multiple of 3, so base64 pieces join cleanly


@dataclass
class OutputCall:
    item: dict[str, Any]
    output_index: int
    arguments: str = ""


@dataclass
class ResponseRun:
    """A response in flight, as the session sees it (for cancel, barge-in, truncate)."""

    id: str
    config: SessionConfig
    in_conversation: bool = True       # False: conversation "none" (out of band)
    metadata: dict[str, Any] | None = None
    status: str = "in_progress"
    cancel_reason: str | None = None
    message: dict[str, Any] | None = None   # the assistant message item, once it starts
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    first_audio_at: float | None = None
    calls: list[OutputCall] = field(default_factory=list)
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # Where its events come from when not the pipeline: an adopted held reply's events
    # (`speculative`), or a scripted utterance (a phone call's greeting).
    source: AsyncGenerator[Any, None] | None = None
    speculative: bool = False
    generation: int = 0                    # the session's count of responses (outbox)

    @property
    def audio_ms(self) -> int:
        return len(self.audio) // BYTES_PER_MS.get(self.config.output_format.kind, 48)

    def heard_ms(self, sent_ms: int, now: float | None = None) -> int:
        """The most audio the listener can have played: what was sent (`sent_ms`), and no
        more than the time since the first byte left (playback runs in real time)."""
        if self.first_audio_at is None:
            return 0
        elapsed = int(((now or time.perf_counter()) - self.first_audio_at) * 1000)
        return min(self.audio_ms, sent_ms, max(elapsed, 0))


@dataclass
class ResponseContext:
    """What a response needs from its session, and nothing more."""

    send: Callable[[dict[str, Any], int], Awaitable[None]]  # (event, audio ms) for sending
    conversation: Conversation
    replies: Callable[[], AsyncGenerator[Any, None]]   # the pipeline's events for this response
    rate_limits: list[dict[str, Any]]
    sent_audio_ms: Callable[[], int]            # how much of its audio has gone out
    on_first_audio: Callable[[], None]


class ResponseWriter:
    """Runs one response and emits its events; `run` is its outcome (status, calls).

    Call it as its own task: cancelling the task is how a response is cancelled. It
    closes what it started (the pipeline, an adopted held reply) on every path."""

    def __init__(self, context: ResponseContext, run: ResponseRun):
        self.context = context
        self.run = run
        self.config = run.config

    async def __call__(self) -> ResponseRun:
        await self._respond()
        return self.run

    async def _respond(self) -> None:
        run = self.run
        await self._emit("response.created", response=self._response_object())
        await self._emit("rate_limits.updated", rate_limits=self.context.rate_limits)
        try:
            await self._generate()
            run.status = "incomplete" if run.status == "length" else "completed"
        except asyncio.CancelledError:
            run.status = "cancelled"
            # Shielded: the session closing (a second cancel) must not leave the items
            # open in the store. Bounded: a store or outbox that never answers must not
            # keep the response, and so the session's decoder slot, forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._wind_down()), WIND_DOWN_S)
            return
        except Exception as exc:
            log.exception("response %s failed", run.id)
            run.status = "failed"
            with contextlib.suppress(Exception):  # the store may be what failed
                await self._close_items("incomplete")
            await self._done(error=exc)
            return
        await self._close_items("incomplete" if run.status == "incomplete" else "completed")
        await self._done()

    async def _wind_down(self) -> None:
        await self._close_items("incomplete", cut_to_heard=True)
        await self._done()

    # -- generation -------------------------------------------------------------------------

    async def _generate(self) -> None:
        source = self.run.source if self.run.source is not None else self.context.replies()
        # aclosing: a cancelled or failed response stops its pipeline (decoder, TTS) here
        # and now, not whenever the generator is collected.
        async with aclosing(source) as events:
            async for event in events:
                await self._handle(event)

    async def _handle(self, event: Any) -> None:
        if self.run.first_token_at is None:
            self.run.first_token_at = time.perf_counter()
        if isinstance(event, TextDelta):
            await self._text(event.text)
        elif isinstance(event, AudioData):
            await self._audio(event.data)
        elif isinstance(event, ToolCallDelta):
            await self._call(event)
        elif isinstance(event, ChoiceDone):
            self._usage(event)
            if event.finish_reason == "length":
                self.run.status = "length"

    async def _start_message(self) -> dict[str, Any]:
        run = self.run
        if run.message is None:
            # The part is there from the start, empty, as the schema has it (a part of
            # its kind always carries its transcript or text).
            part = {"type": "output_audio", "transcript": ""} if self.config.audio_output \
                else {"type": "output_text", "text": ""}
            run.message = {"id": new_item_id(), "object": "realtime.item", "type": "message",
                           "status": "in_progress", "role": "assistant", "content": [part]}
            run.output.append(run.message)
            await self._item_added(run.message)
            await self._emit("response.content_part.added", **self._where(run.message),
                             part=self._part(done=False))
        return run.message

    async def _text(self, text: str) -> None:
        item = await self._start_message()
        self.run.text += text
        kind = "response.output_audio_transcript.delta" if self.config.audio_output \
            else "response.output_text.delta"
        await self._emit(kind, **self._where(item), delta=text)

    async def _audio(self, data: bytes) -> None:
        item = await self._start_message()
        if self.run.first_audio_at is None:
            self.run.first_audio_at = time.perf_counter()
            self.context.on_first_audio()
        # A clause arrives whole; it leaves in pieces of DELTA_MS so that a player can
        # start at once and a barge-in stops the sending within one piece.
        step = DELTA_MS * BYTES_PER_MS.get(self.config.output_format.kind, 48)
        for start in range(0, len(data), step):
            piece = data[start:start + step]
            self.run.audio += piece
            await self._emit("response.output_audio.delta", **self._where(item),
                             delta=base64.b64encode(piece).decode(),
                             audio_ms=len(piece) // BYTES_PER_MS.get(
                                 self.config.output_format.kind, 48))

    async def _call(self, event: ToolCallDelta) -> None:
        fragment = event.fragment
        if fragment.id is not None:
            item = {"id": new_item_id(), "object": "realtime.item", "type": "function_call",
                    "status": "in_progress", "name": fragment.name, "call_id": fragment.id,
                    "arguments": ""}
            self.run.output.append(item)
            self.run.calls.append(OutputCall(item, len(self.run.output) - 1))
            await self._item_added(item)
        call = self.run.calls[fragment.index] if fragment.index < len(self.run.calls) \
            else self.run.calls[-1]
        if fragment.arguments:
            call.arguments += fragment.arguments
            await self._emit("response.function_call_arguments.delta",
                             response_id=self.run.id, item_id=call.item["id"],
                             output_index=call.output_index, call_id=call.item["call_id"],
                             delta=fragment.arguments)

    def _usage(self, done: ChoiceDone) -> None:
        audio_out = audio_tokens(done.audio_seconds)
        text_out = done.completion_tokens
        self.run.usage = {
            "total_tokens": done.prompt_tokens + text_out + audio_out,
            "input_tokens": done.prompt_tokens, "output_tokens": text_out + audio_out,
            "input_token_details": {"text_tokens": done.prompt_tokens, "audio_tokens": 0,
                                    "image_tokens": 0, "cached_tokens": done.cached_tokens,
                                    "cached_tokens_details": {"text_tokens": done.cached_tokens,
                                                              "audio_tokens": 0,
                                                              "image_tokens": 0}},
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}

    # -- closing ----------------------------------------------------------------------------

    async def _close_items(self, status: str, *, cut_to_heard: bool = False) -> None:
        """Close the output items with `status`; a cancelled reply keeps only the words
        the listener can have heard."""
        run = self.run
        if run.message is not None:
            text = run.text
            if cut_to_heard and self.config.audio_output:
                heard = run.heard_ms(self.context.sent_audio_ms())
                text = truncate_transcript(run.text, heard, run.audio_ms)
                del run.audio[heard * BYTES_PER_MS.get(self.config.output_format.kind, 48):]
            await self._finish_message(text, status)
        for call in run.calls:
            await self._finish_call(call, status)

    async def _finish_message(self, text: str, status: str) -> None:
        item, run = self.run.message, self.run
        assert item is not None
        where = self._where(item)
        if self.config.audio_output:
            item["content"] = [{"type": "output_audio", "transcript": text}]
            await self._emit("response.output_audio.done", **where)
            await self._emit("response.output_audio_transcript.done", **where, transcript=text)
        else:
            item["content"] = [{"type": "output_text", "text": text}]
            await self._emit("response.output_text.done", **where, text=text)
        await self._emit("response.content_part.done", **where,
                         part=self._part(done=True, text=text))
        item["status"] = status
        await self._item_done(item, run.output.index(item))
        if run.in_conversation and run.audio:
            await self.context.conversation.save_audio(item["id"], bytes(run.audio))

    async def _finish_call(self, call: OutputCall, status: str) -> None:
        item = call.item
        item["arguments"], item["status"] = call.arguments, status
        if status == "completed":
            await self._emit("response.function_call_arguments.done", response_id=self.run.id,
                             item_id=item["id"], output_index=call.output_index,
                             call_id=item["call_id"], name=item["name"],
                             arguments=call.arguments)
        await self._item_done(item, call.output_index)

    async def _done(self, error: Exception | None = None) -> None:
        run = self.run
        details: dict[str, Any] | None = None
        if run.status == "cancelled":
            details = {"type": "cancelled", "reason": run.cancel_reason or "client_cancelled"}
        elif run.status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif run.status == "failed":
            details = {"type": "failed", "error": {"type": "server_error",
                                                   "code": "response_failed",
                                                   "message": str(error or "failed")}}
        await self._emit("response.done", response=self._response_object(details))

    # -- event helpers ------------------------------------------------------------------------

    def _response_object(self, details: dict[str, Any] | None = None) -> dict[str, Any]:
        run = self.run
        return to_response_object(
            self.config, response_id=run.id, status=run.status
            if run.status in ("completed", "cancelled", "failed", "incomplete")
            else "in_progress", output=[self._snapshot(i) for i in run.output],
            conversation_id=self.context.conversation.id if run.in_conversation else None,
            status_details=details, usage=run.usage, metadata=run.metadata)

    @staticmethod
    def _snapshot(item: dict[str, Any]) -> dict[str, Any]:
        """The item as it is now: events wait in the send queue while the response goes
        on changing the item (status, content), so each event carries its own copy."""
        return {**item, "content": [dict(p) for p in item["content"]]} if "content" in item \
            else dict(item)

    def _part(self, *, done: bool, text: str = "") -> dict[str, Any]:
        if self.config.audio_output:
            return {"type": "audio", "transcript": text if done else ""}
        return {"type": "text", "text": text if done else ""}

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"response_id": self.run.id, "item_id": item["id"],
                "output_index": self.run.output.index(item), "content_index": 0}

    async def _item_added(self, item: dict[str, Any]) -> None:
        index = self.run.output.index(item)
        await self._emit("response.output_item.added", response_id=self.run.id,
                         output_index=index, item=self._snapshot(item))
        if self.run.in_conversation:
            previous = await self.context.conversation.add(item)
            await self._emit("conversation.item.added", previous_item_id=previous,
                             item=self._snapshot(item))

    async def _item_done(self, item: dict[str, Any], index: int) -> None:
        await self._emit("response.output_item.done", response_id=self.run.id,
                         output_index=index, item=self._snapshot(item))
        if self.run.in_conversation:
            await self.context.conversation.save()
            await self._emit("conversation.item.done",
                             previous_item_id=self.context.conversation.previous_id(item["id"]),
                             item=self._snapshot(item))

    async def _emit(self, event_type: str, audio_ms: int = 0, **fields: Any) -> None:
        await self.context.send(server_event(event_type, **fields), audio_ms)
