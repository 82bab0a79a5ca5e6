"""The session manager: one Realtime connection's state machine.

    listening ──speech_started──► user speaking ──speech_stopped──► (transcribe) ──►
    responding ──first audio──► speaking ──response.done──► listening
         ▲                              │ function call (server tool)
         └──── follow-up response ◄── waiting on a tool

Client events arrive in order through `handle`; everything the session says goes through
`send`, a bounded queue the connection drains (a client that reads slowly slows the
response down instead of growing memory). Barge-in: speech that lasts `backchannel_ms`
while a response runs cancels it (shorter speech — "uh-huh", a cough — is dropped and the
response goes on). A cancelled response closes its items as incomplete, with the
assistant's transcript cut to the audio the listener can have heard.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from agent import metrics
from agent.audio import encode_audio
from agent.audio.vad import SpeechPaused, SpeechStarted, SpeechStopped, VadEvent
from agent.chat.server_tools import MAX_TOOL_ROUNDS
from agent.dispatch import CallContext, call_from_item, function_call_output_item
from agent.dispatch.confirmation import confirmed_in_chat
from agent.errors import ParleyError, client_error
from agent.model_ids import resolve_model
from agent.realtime.conversation import Conversation, truncate_transcript
from agent.realtime.input import RATE, InputAudio
from agent.realtime.outbox import Outbox
from agent.realtime.protocol import (
    RealtimeError,
    decode_audio,
    error_event,
    new_item_id,
    new_response_id,
    new_session_id,
    parse_client_event,
    server_event,
    to_client,
)
from agent.realtime.response import (
    BYTES_PER_MS,
    ResponseRun,
    ResponseWriter,
    prefill_conversation,
)
from agent.realtime.session_config import (
    SessionConfig,
    apply_update,
    for_response,
    to_session_object,
)
from agent.realtime.speculation import Speculation
from agent.runtime import Runtime

log = logging.getLogger(__name__)
MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer
SPECULATION_WAIT_S = 2.0  # a held reply that has not decided by then is not waited for


class Session:
    def __init__(self, runtime: Runtime, config: SessionConfig, conversation: Conversation,
                 *, beta: bool, api_key: str | None, vad_model: Any, asr: Any,
                 dispatcher: Any):
        self.runtime = runtime
        self.settings = runtime.settings
        self.config = config
        self.model = config.model
        self.served = resolve_model(config.model, self.settings, "chat")
        self.conversation = conversation
        self.beta = beta
        self.api_key = api_key
        self.id = new_session_id()
        self.decoder_session = f"rt:{conversation.id}"
        self.outbox = Outbox(self.settings.realtime_send_queue)
        self.input = InputAudio(config.input_format, config.turn_detection, vad_model, asr,
                                max_buffer_s=self.settings.realtime_max_buffer_s,
                                language=config.transcription.language
                                if config.transcription else None)
        self.dispatcher = dispatcher
        self.voice_locked = any(i.get("role") == "assistant" for i in conversation.items)
        self.response: ResponseRun | None = None
        self._response_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        # What a response must wait for: transcriptions of committed turns, and prefills of
        # instructions and tool descriptions (see ready_to_respond).
        self._before_responses: set[asyncio.Future] = set()
        self._user_item: str | None = None      # the item the speech in progress becomes
        self._barged = False                    # this turn has interrupted the response
        self._turn_times: dict[str, float] = {}
        self._speculation: Speculation | None = None  # a reply held during a pause
        self.state = "listening"

    # -- the connection's side --------------------------------------------------------------

    async def start(self) -> None:
        metrics.SESSIONS.inc()
        await self.send(server_event("session.created", session=self._session_object()))
        await self.send(server_event("conversation.created", conversation={
            "id": self.conversation.id, "object": "realtime.conversation"}))
        if self.conversation.session is None:
            self.conversation.session = self._session_object()
            await self.conversation.save()
        self._prefill()

    async def send(self, event: dict[str, Any]) -> None:
        shaped = to_client(event, beta=self.beta)
        if shaped is not None:
            await self.outbox.put(shaped)

    async def handle(self, raw: str | bytes) -> None:
        """One client event; a bad one gets an `error` event and the session goes on."""
        event_id = None
        try:
            event = parse_client_event(raw, beta=self.beta)
            event_id = event.get("event_id")
            handler = getattr(self, "_on_" + event["type"].replace(".", "_"))
            await handler(event)
        except RealtimeError as exc:
            exc.event_id = exc.event_id or event_id
            await self.send(exc.to_event())
        except ParleyError as exc:
            await self.send(_error_event(exc, event_id))

    async def close(self) -> None:
        """Stop everything the session started; free its decoder cache slot."""
        metrics.SESSIONS.dec()
        await self._drop_speculation()
        tasks = [t for t in (self._response_task, *self._tasks) if t and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.input.aclose()
        with contextlib.suppress(Exception):
            scheduler = await self.runtime.scheduler(self.served.target)
            await scheduler.release(self.decoder_session)

    # -- session ------------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        old = self.config
        await self._drop_speculation()
        self.config = apply_update(old, event["session"], voice_locked=self.voice_locked,
                                   beta=self.beta, event_id=event.get("event_id"))
        if self.config.input_format != old.input_format:
            self.input.set_format(self.config.input_format)
        if self.config.turn_detection != old.turn_detection:
            self.input.set_turn_detection(self.config.turn_detection)
        self.conversation.session = self._session_object()
        await self.conversation.save()
        await self.send(server_event("session.updated", session=self._session_object()))
        # What the prompt holds: instructions, and the tools described in it (the server's
        # tools are there once `parley.server_tools` turns them on).
        if (self.config.instructions, self.config.tools, self.config.server_tools) != \
                (old.instructions, old.tools, old.server_tools):
            self._prefill()

    def _session_object(self) -> dict[str, Any]:
        return to_session_object(self.config, session_id=self.id, beta=False)

    # -- input audio ----------------------------------------------------------------------------

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        data = decode_audio(event["audio"], event_id=event.get("event_id"))
        for vad_event in await self.input.append(data, event.get("event_id")):
            await self._on_vad(vad_event)
        spec, voiced = self._speculation, self.input.voiced_until
        if spec is not None and voiced is not None and voiced > spec.speech_end:
            await self._drop_speculation()  # the pause was a breath: the user goes on
        await self._maybe_barge_in()

    async def _on_vad(self, event: VadEvent) -> None:
        if isinstance(event, SpeechStarted):
            self._user_item, self._barged = new_item_id(), False
            self.state = "user speaking"
            await self.send(server_event("input_audio_buffer.speech_started",
                                         audio_start_ms=event.audio_start_ms,
                                         item_id=self._user_item))
            if self.input.turn is not None:
                self._spawn(self._follow_partials(self.input.turn, self._user_item))
        elif isinstance(event, SpeechPaused):
            if self.input.turn is not None:
                self.input.turn.speculate(event.speech_end)
                await self._speculate(event.speech_end)
        elif isinstance(event, SpeechStopped):
            await self._speech_stopped(event)

    async def _maybe_barge_in(self) -> None:
        """Cut the response short once the user has spoken long enough to mean it."""
        turn = self.config.turn_detection
        since, voiced_until = self.input.speaking_since, self.input.voiced_until
        if (self.response is None or since is None or voiced_until is None or self._barged
                or turn is None or not turn.interrupt_response):
            return
        # Voiced time, not time since the onset: the pause after an "uh-huh" is no speech.
        if (voiced_until - since) * 1000 >= self.config.backchannel_ms * RATE:
            self._barged = True
            await self.cancel_response("turn_detected")

    async def _speech_stopped(self, event: SpeechStopped) -> None:
        item_id = self._user_item or new_item_id()
        self._user_item = None
        await self.send(server_event("input_audio_buffer.speech_stopped",
                                     audio_end_ms=event.audio_end_ms, item_id=item_id))
        turn = self.input.detach_turn()
        if self.response is not None and not self._barged:
            # Too short to interrupt: a backchannel. It is not a turn of its own.
            if turn is not None:
                await turn.aclose()
            self.input.take(event.sample)
            self.state = "speaking"
            return
        self._turn_times[item_id] = time.perf_counter() - \
            (event.sample - event.speech_end) / RATE
        audio, start, _ = self.input.take(event.sample)
        if turn is not None:  # the item's audio starts where the turn does (prefix padding)
            audio = audio[max(turn.start_sample - start, 0):]
        await self._commit(item_id, audio, turn, event.speech_end)

    async def _speculate(self, speech_end: int) -> None:
        """Start the reply to the words before this pause, held until the turn ends here."""
        await self._drop_speculation()
        turn = self.config.turn_detection
        if (self.settings.realtime_speculate and self.config.speculate and turn is not None
                and turn.create_response
                and self.response is None and self.input.turn is not None):
            self._speculation = Speculation(self, self.input.turn, speech_end)

    async def _drop_speculation(self) -> None:
        spec, self._speculation = self._speculation, None
        if spec is not None:
            await self._discard(spec)

    @staticmethod
    async def _discard(spec: Speculation) -> None:
        log.debug("held reply dropped: pause at %s, text %r", spec.speech_end, spec.text)
        metrics.speculation("dropped" if spec.text is not None else "not_started")
        await spec.cancel()

    async def _adopt_speculation(self, speech_end: int | None, text: str,
                                 ) -> Speculation | None:
        """The held reply, when it answers exactly the turn just confirmed; else None."""
        spec, self._speculation = self._speculation, None
        if spec is None:
            return None
        if spec.speech_end == speech_end:  # the same ASR pass may have woken us first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(spec.decided(), SPECULATION_WAIT_S)
        messages = self.conversation.messages(self.config.instructions)
        if spec.matches(speech_end, text, self.config, messages):
            metrics.speculation("used")
            return spec
        log.debug("held reply not used: turn end at %s, final %r, same messages %s",
                  speech_end, text, spec.messages == messages)
        await self._discard(spec)
        return None

    async def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        if self.input.buffered_ms < MIN_COMMIT_MS:
            raise RealtimeError(
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {self.input.buffered_ms}ms "
                "of audio.", code="input_audio_buffer_commit_empty",
                event_id=event.get("event_id"))
        turn = self.input.detach_turn()
        await self._drop_speculation()
        audio, _, _ = self.input.take()
        item_id, self._user_item = self._user_item or new_item_id(), None
        self._turn_times[item_id] = time.perf_counter()
        await self._commit(item_id, audio, turn, None, manual=True)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        turn = self.input.detach_turn()
        if turn is not None:
            await turn.aclose()
        await self._drop_speculation()
        self.input.clear()
        self._user_item = None
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _commit(self, item_id: str, audio: Any, turn: Any, speech_end: int | None,
                      manual: bool = False) -> None:
        """The turn's audio becomes a user item; its transcript (and, with server VAD and
        create_response, the reply) follows when the ASR is done."""
        item = {"id": item_id, "object": "realtime.item", "type": "message",
                "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        previous = await self.conversation.add(item)
        await self.send(server_event("input_audio_buffer.committed",
                                     previous_item_id=previous, item_id=item_id))
        await self.send(server_event("conversation.item.added", previous_item_id=previous,
                                     item=item))
        self.state = "listening"
        self._spawn(self._transcribe(item, audio, turn, speech_end, manual),
                    before_responses=True)

    async def ready_to_respond(self) -> None:
        """Wait until every committed user turn has its transcript, and until the prefills
        of instructions and tool descriptions have run. A response reads the conversation as
        words, and a turn still being transcribed would be missing from it (a manual commit
        followed at once by response.create). A prefill it raced would be done twice: the
        response would prefill the same thousands of tokens itself, and the late prefill
        would hold the decoder's slot for nothing."""
        pending = [t for t in self._before_responses if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending)  # cancelling the response leaves them running

    async def _transcribe(self, item: dict[str, Any], audio: Any, turn: Any,
                          speech_end: int | None, manual: bool) -> None:
        language = self.config.transcription and self.config.transcription.language
        try:
            if turn is not None:
                transcript = await turn.finish(speech_end)
            else:
                asr = await self.runtime.asr()
                transcript = await asr.transcribe_async(audio, language=language, words=False)
        except Exception as exc:
            log.exception("transcription failed")
            if self.config.transcription is not None:
                await self.send(server_event(
                    "conversation.item.input_audio_transcription.failed", item_id=item["id"],
                    content_index=0, error={"type": "server_error", "code": "asr_failed",
                                            "message": str(exc), "param": None}))
            return
        text = transcript.text.strip()
        item["content"][0]["transcript"] = text
        await self.conversation.save()
        await self.conversation.save_audio(item["id"], encode_audio(audio, RATE, "pcm16"))
        await self.send(server_event("conversation.item.done",
                                     previous_item_id=self.conversation.previous_id(item["id"]),
                                     item=item))
        if self.config.transcription is not None:
            await self.send(server_event(
                "conversation.item.input_audio_transcription.completed", item_id=item["id"],
                content_index=0, transcript=text,
                usage={"type": "duration", "seconds": round(len(audio) / RATE, 3)}))
        turn_detection = self.config.turn_detection
        if (text and not manual and turn_detection is not None
                and turn_detection.create_response and self.response is None
                and self.input.speaking_since is None):
            spec = await self._adopt_speculation(speech_end, text)
            await self.start_response(None, user_item=item["id"], speculation=spec)
        else:
            await self._drop_speculation()

    async def _follow_partials(self, turn: Any, item_id: str) -> None:
        """Partial transcripts while the user speaks: sent as `…transcription.delta` events
        (only text that extends what was sent; a revised partial waits for the final), and
        prefilled into the session's KV cache so the reply prefills only the last words."""
        sent = ""
        prefill: asyncio.Future | None = None
        async for partial in turn.partials():
            text = partial.text.strip()
            if (self.config.transcription is not None and text.startswith(sent)
                    and len(text) > len(sent)):
                await self.send(server_event(
                    "conversation.item.input_audio_transcription.delta", item_id=item_id,
                    content_index=0, delta=text[len(sent):]))
                sent = text
            idle = prefill is None or prefill.done()  # never queue prefills behind one another
            if (text and idle and self.response is None and self._speculation is None
                    and self.settings.realtime_speculate and self.config.speculate):
                prefill = self._spawn(prefill_conversation(self, heard=text))

    # -- conversation items -----------------------------------------------------------------------

    async def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = dict(event["item"])
        item.setdefault("id", new_item_id())
        item.update(object="realtime.item", status=item.get("status") or "completed")
        previous = await self.conversation.add(item, event.get("previous_item_id"),
                                               event_id=event.get("event_id"))
        await self.send(server_event("conversation.item.added", previous_item_id=previous,
                                     item=item))
        await self.send(server_event("conversation.item.done", previous_item_id=previous,
                                     item=item))

    async def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = dict(self.conversation.get(event["item_id"], event_id=event.get("event_id")))
        audio = await self.conversation.audio(item["id"])
        if audio and item.get("content"):
            item["content"] = [dict(item["content"][0],
                                    audio=base64.b64encode(audio).decode()),
                               *item["content"][1:]]
        await self.send(server_event("conversation.item.retrieved", item=item))

    async def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        await self.conversation.delete(event["item_id"], event_id=event.get("event_id"))
        await self.send(server_event("conversation.item.deleted", item_id=event["item_id"]))

    async def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        """The client played `audio_end_ms` of an assistant item: the rest, and the words
        spoken in it, leave the conversation (the model won't think it said them)."""
        event_id = event.get("event_id")
        item = self.conversation.get(event["item_id"], event_id=event_id)
        if item.get("role") != "assistant" or item.get("type") != "message":
            raise RealtimeError("only assistant message items can be truncated",
                                code="invalid_item_type", param="item_id", event_id=event_id)
        audio = await self.conversation.audio(item["id"]) or b""
        per_ms = BYTES_PER_MS.get(self.config.output_format.kind, 48)
        total_ms, end_ms = len(audio) // per_ms, int(event["audio_end_ms"])
        if end_ms > total_ms:
            raise RealtimeError(f"Audio content of {total_ms}ms is already shorter than "
                                f"{end_ms}ms", code="invalid_value", param="audio_end_ms",
                                event_id=event_id)
        part = item["content"][0]
        if "transcript" in part:
            part["transcript"] = truncate_transcript(part["transcript"] or "", end_ms, total_ms)
        await self.conversation.save()
        await self.conversation.save_audio(item["id"], audio[: end_ms * per_ms])
        await self.send(server_event("conversation.item.truncated", item_id=item["id"],
                                     content_index=event.get("content_index", 0),
                                     audio_end_ms=end_ms))

    # -- responses ----------------------------------------------------------------------------

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        if params.get("input") is not None:
            raise RealtimeError("response.input is not supported by Parley yet; the "
                                "response reads the conversation", code="unsupported_parameter",
                                param="response.input", event_id=event.get("event_id"))
        await self.start_response(params, event_id=event.get("event_id"))

    async def start_response(self, params: dict[str, Any] | None, *, event_id: str | None = None,
                             user_item: str | None = None,
                             speculation: Speculation | None = None) -> None:
        if self.response is not None:
            raise RealtimeError(
                f"Conversation already has an active response in progress: "
                f"{self.response.id}. Wait until the response is finished before creating a "
                "new one.", code="conversation_already_has_active_response",
                event_id=event_id)
        config = for_response(self.config, params, voice_locked=self.voice_locked,
                              beta=self.beta, event_id=event_id)
        params = params or {}
        run = ResponseRun(new_response_id(), config,
                          in_conversation=params.get("conversation", "auto") != "none",
                          metadata=params.get("metadata"), speculation=speculation)
        self.response = run
        self.state = "responding"
        if user_item is not None:
            self._turn_times[run.id] = self._turn_times.pop(user_item, time.perf_counter())
        self._response_task = asyncio.get_running_loop().create_task(
            ResponseWriter(self, run)())

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted and wanted != self.response.id):
            raise RealtimeError("Cancellation failed: no active response found",
                                code="response_cancel_not_active", event_id=event.get("event_id"))
        await self.cancel_response("client_cancelled")

    async def cancel_response(self, reason: str) -> None:
        run, task = self.response, self._response_task
        if run is None or task is None or task.done():
            return
        run.cancel_reason = reason
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _on_output_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        raise RealtimeError("output_audio_buffer.clear applies to WebRTC and SIP sessions; "
                            "over WebSocket send conversation.item.truncate instead",
                            code="unsupported_event", event_id=event.get("event_id"))

    def response_finished(self, run: ResponseRun) -> None:
        """Called by the response as its last act: the session is free for the next."""
        if self.response is run:
            self.response = None
            self.state = "listening" if self.input.speaking_since is None else "user speaking"
        if run.status == "completed":
            calls = [c.item for c in run.calls if c.item["name"] in self.server_tool_names()]
            if calls and run.in_conversation:
                self.state = "waiting on a tool"
                self._spawn(self._run_tools(calls))
        stages, voice_to_voice = self._turn_latency(run)
        metrics.turn_finished(run.status, stages, voice_to_voice, run.speculation is not None)
        if self.config.debug_events and run.first_audio_at is not None:
            self._spawn(self.send(server_event(
                "parley.turn.latency", response_id=run.id,
                item_id=run.message["id"] if run.message else None, stages_ms=stages,
                voice_to_voice_ms=voice_to_voice, speculative=run.speculation is not None)))

    def voice_used(self) -> None:
        self.voice_locked = True
        self.state = "speaking"

    def rate_limits(self) -> list[dict[str, Any]]:
        """Parley meters nothing per key: report the session's own ceilings."""
        return [{"name": "requests", "limit": 1000, "remaining": 1000, "reset_seconds": 60},
                {"name": "tokens", "limit": self.settings.max_output_tokens * 100,
                 "remaining": self.settings.max_output_tokens * 100, "reset_seconds": 60}]

    # -- tools --------------------------------------------------------------------------------

    def _call_context(self) -> CallContext:
        messages = self.conversation.messages("")
        return CallContext(session_id=f"realtime:{self.conversation.id}", api_key=self.api_key,
                           confirmed=confirmed_in_chat(messages))

    def server_tool_names(self) -> frozenset[str]:
        """The dispatcher's tools this session runs itself: with `parley.server_tools`
        true, or unset and the API key listed in the tools config's `execute_keys`."""
        wanted = self.config.server_tools
        if wanted is None:
            keys = self.runtime.tools_config.execute_keys if self.runtime.tools_config else ()
            wanted = "*" in keys or (self.api_key is not None and self.api_key in keys)
        if self.dispatcher is None or not wanted:
            return frozenset()
        own = {t["name"] for t in self.config.tools}
        names = {s.name for s in self.dispatcher.tool_specs(self._call_context())}
        return frozenset(names - own)

    def chat_tools(self, config: SessionConfig) -> list[dict[str, Any]]:
        """The session's tools in Chat Completions shape, the server's after the client's."""
        tools = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in config.tools]
        names = self.server_tool_names()
        if names:
            tools += [t for t in self.dispatcher.openai_tools(self._call_context())
                      if t["function"]["name"] in names]
        return tools

    async def _run_tools(self, calls: list[dict[str, Any]]) -> None:
        """Run the response's server-side calls, add their outputs, and answer from them.
        A call that started runs to the end and is recorded even if the user interrupts."""
        context = self._call_context()
        results = await asyncio.gather(*(
            self.dispatcher.execute(call_from_item(c), context) for c in calls))
        for result in results:
            item = {"id": new_item_id(), "object": "realtime.item", "status": "completed",
                    **function_call_output_item(result)}
            previous = await self.conversation.add(item)
            await self.send(server_event("conversation.item.added", previous_item_id=previous,
                                         item=item))
            await self.send(server_event("conversation.item.done", previous_item_id=previous,
                                         item=item))
        if self.response is None and self.input.speaking_since is None:
            await self.start_response(self._follow_up_params())

    def _follow_up_params(self) -> dict[str, Any] | None:
        """The response that answers from server tool results, as chat's server tools
        have it: after a forced call the model chooses freely, and once it repeats a call
        or has made MAX_TOOL_ROUNDS calls since the user spoke it answers in words (a
        session whose tool_choice forces a call would otherwise loop call → result → call)."""
        calls = []
        for item in reversed(self.conversation.items):
            if item.get("type") == "message" and item.get("role") == "user":
                break
            if item.get("type") == "function_call":
                calls.append(call_from_item(item).fingerprint())
        if len(set(calls)) < len(calls) or len(calls) >= MAX_TOOL_ROUNDS:
            return {"tool_choice": "none"}
        forced = self.config.tool_choice == "required" or isinstance(self.config.tool_choice,
                                                                      dict)
        return {"tool_choice": "auto"} if forced else None

    # -- helpers --------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """While the user speaks, put the conversation so far (instructions and tool
        descriptions are most of it) into the session's KV cache, so the reply after the
        turn prefills only the new words."""
        if self.response is None:
            self._spawn(prefill_conversation(self), before_responses=True)

    def _turn_latency(self, run: ResponseRun) -> tuple[dict[str, int | None], int | None]:
        """The stages of the turn `run` answered (ms), and voice to voice when it was a
        spoken turn (its speech end is known)."""
        started = self._turn_times.pop(run.id, None)
        stages = {"response_to_first_token": _ms(run.first_token_at, run.started_at),
                  "response_to_first_audio": _ms(run.first_audio_at, run.started_at)}
        if started is None:
            return stages, None
        stages["speech_end_to_response"] = _ms(run.started_at, started)
        return stages, _ms(run.first_audio_at, started)

    def _spawn(self, work: Awaitable[Any], before_responses: bool = False) -> asyncio.Future:
        """Run `work` as the session's task; `before_responses`: responses wait for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        if before_responses:
            self._before_responses.add(task)
            task.add_done_callback(self._before_responses.discard)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("realtime session task failed", exc_info=task.exception())


def _ms(later: float | None, earlier: float | None) -> int | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000)


def _error_event(exc: Exception, event_id: str | None) -> dict[str, Any]:
    return error_event(client_error(exc) or ParleyError("internal server error"), event_id)

