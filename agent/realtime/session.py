"""The session manager: one Realtime connection, as a protocol adapter around its turns.

Client events arrive in order through `handle`; VAD events come out of the input audio
(agent.realtime.input). Every decision about turns — when speech is a turn, when it barges
in, when to answer, which reply is held — belongs to `TurnState` (agent.realtime.turns):
the session feeds it what happened and carries out the actions it returns, speaking the
protocol on both sides. Each response runs as its own task (agent.realtime.response) and
is cancelled by cancelling that task; its events go out through the outbox stamped with
its generation, so a cancelled response's unsent audio is dropped there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import numpy as np

from agent import metrics
from agent.api_keys import executes_tools, scope_of
from agent.audio import encode_audio
from agent.audio.vad import SpeechPaused, SpeechStarted, SpeechStopped, VadEvent
from agent.chat.server_tools import MAX_TOOL_ROUNDS
from agent.dispatch import CallContext, call_from_item, function_call_output_item
from agent.dispatch.confirmation import confirmed_in_chat
from agent.dispatch.types import key_fingerprint
from agent.errors import ParleyError, client_error
from agent.limits import Limits
from agent.model_ids import resolve_model
from agent.realtime.conversation import Conversation, truncate_transcript
from agent.realtime.engines import FrameScorer, Playback, Replies, ToolRunner, Transcriber
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
from agent.realtime.replies import ChatReplies
from agent.realtime.response import (
    BYTES_PER_MS,
    ResponseContext,
    ResponseRun,
    ResponseWriter,
)
from agent.realtime.session_config import (
    SessionConfig,
    apply_update,
    for_response,
    to_session_object,
)
from agent.realtime.speculation import Speculation
from agent.realtime.turns import (
    Action,
    Backchannel,
    CancelResponse,
    Commit,
    DropHeld,
    HoldAudio,
    NoActiveResponse,
    Phase,
    ReleaseAudio,
    Respond,
    ResponseActive,
    RunTools,
    Speculate,
    TurnPolicy,
    TurnState,
)
from agent.runtime import Runtime
from agent.speech.asr_stream import ASRStream

log = logging.getLogger(__name__)
MIN_COMMIT_MS = 100  # OpenAI's smallest committable buffer
SPECULATION_WAIT_S = 2.0  # a held reply that has not decided by then is not waited for
CLOSE_WAIT_S = 10.0  # the most closing waits for the session's tasks to stop
# While the store is down, the conversation is written through again after this, doubling.
WRITE_THROUGH_FIRST_S = 0.25
WRITE_THROUGH_MAX_S = 5.0


class Session:
    def __init__(self, runtime: Runtime, config: SessionConfig, conversation: Conversation,
                 *, beta: bool, api_key: str | None, vad_model: FrameScorer,
                 asr: Transcriber, dispatcher: ToolRunner | None,
                 replies: Replies | None = None, playback: Playback | None = None):
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
        self.outbox = Outbox(self.settings.realtime_send_queue,
                             self.settings.realtime_audio_ahead_ms)
        self.input = InputAudio(config.input_format, config.turn_detection, vad_model, asr,
                                max_buffer_s=self.settings.realtime_max_buffer_s,
                                language=config.transcription.language
                                if config.transcription else None)
        self.asr = asr
        self.dispatcher = dispatcher
        self.replies: Replies = replies or ChatReplies(runtime, self.served,
                                                       self.decoder_session, self.chat_tools)
        self.playback = playback
        self.turns: TurnState[Speculation] = TurnState(self._policy(), new_item_id)
        self.voice_locked = any(i.get("role") == "assistant" for i in conversation.items)
        # The responses in flight by generation (one, and briefly the one finishing).
        self._runs: dict[int, tuple[ResponseRun, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Future] = set()
        # What a response must wait for: transcriptions of committed turns, and prefills of
        # instructions and tool descriptions (see ready_to_respond).
        self._before_responses: set[asyncio.Future] = set()
        self._turn_times: dict[str, float] = {}
        self._closed = False
        self._writing_through: asyncio.Future | None = None
        conversation.on_unsaved = self._write_through_later

    def _policy(self) -> TurnPolicy:
        turn = self.config.turn_detection
        return TurnPolicy(
            create_response=turn is not None and turn.create_response,
            interrupt_response=turn is not None and turn.interrupt_response,
            backchannel_ms=self.config.backchannel_ms,
            speculate=self.settings.realtime_speculate and self.config.speculate)

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
        if self.dispatcher is not None and (unanswered := self._unanswered_server_calls()):
            self._spawn(self._finish_unanswered_calls(unanswered))

    async def send(self, event: dict[str, Any], *, generation: int | None = None,
                   audio_ms: int = 0) -> None:
        """Queue `event` for the client: the session's own, or response `generation`'s."""
        shaped = to_client(event, beta=self.beta)
        if shaped is not None:
            await self.outbox.put(shaped, generation, audio_ms)

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

    def _write_through_later(self) -> None:
        """The store is down: keep trying until the conversation is in it again."""
        if self._writing_through is None and not self._closed:
            self._writing_through = self._spawn(self._write_through())

    async def _write_through(self) -> None:
        wait = WRITE_THROUGH_FIRST_S
        try:
            while not await self.conversation.flush():
                await asyncio.sleep(wait)
                wait = min(wait * 2, WRITE_THROUGH_MAX_S)
            log.warning("conversation %s written through to the store again",
                        self.conversation.id)
        finally:
            self._writing_through = None

    async def wind_up(self, deadline: float) -> None:
        """Let the response in progress, and the follow-up its server tools start, run to
        their end, but not past `deadline` (time.monotonic()): a draining server closes
        the session after this."""
        while self._runs or self.turns.phase is Phase.AWAITING_TOOL:
            left = deadline - time.monotonic()
            pending = [task for _, task in self._runs.values()] + list(self._tasks)
            if left <= 0 or not pending:
                return
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    async def close(self) -> None:
        """Stop everything the session started; free its decoder cache slot. Bounded: a
        task that does not stop within CLOSE_WAIT_S is left behind, logged, rather than
        keeping the slot."""
        metrics.SESSIONS.dec()
        self._closed = True  # what the tasks being cancelled would start next, they don't
        held, self.turns.held = self.turns.held, None
        tasks = [t for t in (*(task for _, task in self._runs.values()), *self._tasks)
                 if not t.done()]
        for task in tasks:
            task.cancel()
        if held is not None:
            tasks.append(asyncio.ensure_future(held.cancel()))
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            if stuck:
                log.error("realtime session %s: %d tasks did not stop on close", self.id,
                          len(stuck))
        await self.input.aclose()
        if self.conversation.unsaved:  # a last try: the client may resume elsewhere
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conversation.flush(), CLOSE_WAIT_S)
            if self.conversation.unsaved:
                log.error("realtime session %s closed with changes the store never got",
                          self.id)
        with contextlib.suppress(Exception):
            scheduler = await self.runtime.scheduler(self.served.target)
            await scheduler.release(self.decoder_session)

    # -- carrying out the turn state's actions --------------------------------------------------

    async def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if self._closed:
                return
            if isinstance(action, DropHeld):
                await self._discard(action.held)
            elif isinstance(action, HoldAudio):
                self.outbox.hold(action.generation)
            elif isinstance(action, ReleaseAudio):
                self.outbox.release(action.generation)
            elif isinstance(action, CancelResponse):
                await self._cancel(action)
            elif isinstance(action, Speculate):
                await self._speculate(action.speech_end)
            elif isinstance(action, Respond):
                await self._respond(action)
            elif isinstance(action, RunTools):
                run, _ = self._runs.get(action.generation, (None, None))
                if run is not None:
                    self._spawn(self._run_tools(self._server_calls(run), action.generation))
            else:  # Commit and Backchannel are carried out where the speech stops
                raise AssertionError(f"unexpected turn action {action!r}")

    async def _cancel(self, action: CancelResponse) -> None:
        """Stop response `generation`: its unsent audio goes at once, what plays at the
        listener too (where the server knows it), then its task. Where playback is known,
        the item keeps what was played."""
        self.outbox.cancel(action.generation)
        entry = self._runs.get(action.generation)
        if entry is None:
            return
        run, task = entry
        if self.playback is not None:
            self.playback.stop(run.id)
        run.cancel_reason = action.reason
        if task is asyncio.current_task():
            return
        if run.status in ("in_progress", "length"):  # still generating (not only playing)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.playback is not None and run.message is not None and run.in_conversation:
            played = self.playback.played_ms(run.message["id"])
            if played is not None:
                await self._truncate(run.message["id"], played, only_shorter=True)

    # -- session ------------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        old = self.config
        self.config = apply_update(old, event["session"], voice_locked=self.voice_locked,
                                   beta=self.beta, event_id=event.get("event_id"))
        await self._act(self.turns.configured(self._policy()))
        if self.config.input_format != old.input_format:
            self.input.set_format(self.config.input_format)
        if self.config.turn_detection != old.turn_detection:
            self.input.set_turn_detection(self.config.turn_detection)
            await self._abandon_speech()
        self.conversation.session = self._session_object()
        await self.conversation.save()
        await self.send(server_event("session.updated", session=self._session_object()))
        # What the prompt holds: instructions, and the tools described in it (the server's
        # tools are there once `parley.server_tools` turns them on).
        if (self.config.instructions, self.config.tools, self.config.server_tools) != \
                (old.instructions, old.tools, old.server_tools):
            self._prefill()

    async def _abandon_speech(self) -> None:
        """A new VAD never reports the end of speech the old one heard begin."""
        turn = self.input.detach_turn()
        if turn is not None:
            await turn.aclose()
        self.input.speaking_since = None
        await self._act(self.turns.speech_abandoned())

    def _session_object(self) -> dict[str, Any]:
        return to_session_object(self.config, session_id=self.id, beta=False)

    # -- input audio ----------------------------------------------------------------------------

    async def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        data = decode_audio(event["audio"], event_id=event.get("event_id"))
        for vad_event in await self.input.append(data, event.get("event_id")):
            await self._on_vad(vad_event)
        since, voiced_until = self.input.speaking_since, self.input.voiced_until
        if self.turns.user_speaking and since is not None and voiced_until is not None:
            # Voiced time, not time since the onset: the pause after an "uh-huh" is no speech.
            voiced_ms = (voiced_until - since) * 1000 // RATE
            await self._act(self.turns.voiced(voiced_ms, voiced_until))

    async def _on_vad(self, event: VadEvent) -> None:
        if isinstance(event, SpeechStarted):
            actions = self.turns.speech_started()
            item_id = self.turns.user_item
            assert item_id is not None
            await self._act(actions)
            await self.send(server_event("input_audio_buffer.speech_started",
                                         audio_start_ms=event.audio_start_ms,
                                         item_id=item_id))
            if self.input.turn is not None:
                self._spawn(self._follow_partials(self.input.turn, item_id))
        elif isinstance(event, SpeechPaused):
            if self.input.turn is not None:
                self.input.turn.speculate(event.speech_end)
            await self._act(self.turns.speech_paused(event.speech_end))
        elif isinstance(event, SpeechStopped):
            await self._speech_stopped(event)

    async def _speech_stopped(self, event: SpeechStopped) -> None:
        actions = self.turns.speech_stopped()
        ended = next(a for a in actions if isinstance(a, Commit | Backchannel))
        await self.send(server_event("input_audio_buffer.speech_stopped",
                                     audio_end_ms=event.audio_end_ms, item_id=ended.item_id))
        turn = self.input.detach_turn()
        if isinstance(ended, Backchannel):
            if turn is not None:
                await turn.aclose()
            self.input.take(event.sample)
        else:
            self._turn_times[ended.item_id] = time.perf_counter() - \
                (event.sample - event.speech_end) / RATE
            audio, start, _ = self.input.take(event.sample)
            if turn is not None:  # the item's audio starts where the turn does (prefix)
                audio = audio[max(turn.start_sample - start, 0):]
            await self._commit(ended.item_id, audio, turn, event.speech_end)
        await self._act([a for a in actions if a is not ended])

    async def _speculate(self, speech_end: int) -> None:
        """Start the reply to the words before this pause, held until the turn ends here."""
        turn = self.input.turn
        if turn is None or self.config.turn_detection is None:
            return
        spec = Speculation(turn, speech_end, config=self.config,
                           items=self.conversation.items, replies=self.replies,
                           voiced_until=lambda: self.input.voiced_until)
        await self._act(self.turns.hold(spec))

    @staticmethod
    async def _discard(spec: Speculation) -> None:
        log.debug("held reply dropped: pause at %s, text %r", spec.speech_end, spec.text)
        metrics.speculation("dropped" if spec.text is not None else "not_started")
        await spec.cancel()

    async def _adopt(self, spec: Speculation | None, speech_end: int | None, text: str,
                     ) -> Speculation | None:
        """The held reply, when it answers exactly the turn just confirmed; else None."""
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
        item_id, actions = self.turns.committed()
        await self._act(actions)
        turn = self.input.detach_turn()
        audio, _, _ = self.input.take()
        self._turn_times[item_id] = time.perf_counter()
        await self._commit(item_id, audio, turn, None)

    async def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        await self._act(self.turns.cleared())
        turn = self.input.detach_turn()
        if turn is not None:
            await turn.aclose()
        self.input.clear()
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _commit(self, item_id: str, audio: np.ndarray, turn: ASRStream | None,
                      speech_end: int | None) -> None:
        """The turn's audio becomes a user item; its transcript (and, when the turn state
        says so, the reply) follows when the ASR is done."""
        item = {"id": item_id, "object": "realtime.item", "type": "message",
                "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        previous = await self.conversation.add(item)
        await self.send(server_event("input_audio_buffer.committed",
                                     previous_item_id=previous, item_id=item_id))
        await self.send(server_event("conversation.item.added", previous_item_id=previous,
                                     item=item))
        self._spawn(self._transcribe(item, audio, turn, speech_end), before_responses=True)

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

    async def _transcribe(self, item: dict[str, Any], audio: np.ndarray,
                          turn: ASRStream | None, speech_end: int | None) -> None:
        language = self.config.transcription.language if self.config.transcription else None
        try:
            if turn is not None:
                transcript = await turn.finish(speech_end)
            else:
                transcript = await self.asr.transcribe_async(audio, language=language,
                                                             words=False)
        except Exception as exc:
            log.exception("transcription failed")
            if self.config.transcription is not None:
                await self.send(server_event(
                    "conversation.item.input_audio_transcription.failed", item_id=item["id"],
                    content_index=0, error={"type": "server_error", "code": "asr_failed",
                                            "message": str(exc), "param": None}))
            await self._act(self.turns.transcribed(item["id"], None))
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
        await self._act(self.turns.transcribed(item["id"], text))

    async def _follow_partials(self, turn: ASRStream, item_id: str) -> None:
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
            if (text and idle and self.turns.response is None and self.turns.held is None
                    and self.turns.policy.speculate):
                prefill = self._spawn(self.replies.prefill(
                    self.config, self.conversation.items, heard=text))

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
        await self._truncate(event["item_id"], int(event["audio_end_ms"]),
                             content_index=event.get("content_index", 0),
                             event_id=event.get("event_id"))

    async def _truncate(self, item_id: str, end_ms: int, *, content_index: int = 0,
                        event_id: str | None = None, only_shorter: bool = False) -> None:
        item = self.conversation.get(item_id, event_id=event_id)
        if item.get("role") != "assistant" or item.get("type") != "message":
            raise RealtimeError("only assistant message items can be truncated",
                                code="invalid_item_type", param="item_id", event_id=event_id)
        audio = await self.conversation.audio(item["id"]) or b""
        per_ms = BYTES_PER_MS.get(self.config.output_format.kind, 48)
        total_ms = len(audio) // per_ms
        if only_shorter and end_ms >= total_ms:
            return
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
                                     content_index=content_index, audio_end_ms=end_ms))

    # -- responses ----------------------------------------------------------------------------

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        if params.get("input") is not None:
            raise RealtimeError("response.input is not supported by Parley yet; the "
                                "response reads the conversation", code="unsupported_parameter",
                                param="response.input", event_id=event.get("event_id"))
        await self.start_response(params, event_id=event.get("event_id"))

    async def _respond(self, action: Respond[Speculation]) -> None:
        """The turn state's answer: to a user turn (perhaps with its held reply), or a
        follow-up on server tool results. A client's response.create that got there first
        answers the same conversation: then there is nothing to do."""
        held = None
        if action.user_item is not None and action.text is not None:
            held = await self._adopt(action.held, action.speech_end, action.text)
        elif action.held is not None:
            await self._discard(action.held)
        params = self._follow_up_params() if action.user_item is None else None
        try:
            await self.start_response(params, user_item=action.user_item, held=held)
        except RealtimeError:
            if held is not None:
                await self._discard(held)
            if self.turns.response is None:
                raise

    async def start_response(self, params: dict[str, Any] | None, *, event_id: str | None = None,
                             user_item: str | None = None,
                             held: Speculation | None = None,
                             scripted: AsyncGenerator[Any, None] | None = None) -> None:
        config = for_response(self.config, params, voice_locked=self.voice_locked,
                              beta=self.beta, event_id=event_id)
        params = params or {}
        run = ResponseRun(new_response_id(), config,
                          in_conversation=params.get("conversation", "auto") != "none",
                          metadata=params.get("metadata"),
                          source=held.events() if held is not None else scripted,
                          speculative=held is not None)
        try:
            run.generation, actions = self.turns.begin_response(run.id)
        except ResponseActive as exc:
            raise RealtimeError(
                f"Conversation already has an active response in progress: "
                f"{exc.response_id}. Wait until the response is finished before creating a "
                "new one.", code="conversation_already_has_active_response",
                event_id=event_id) from None
        if user_item is not None:
            self._turn_times[run.id] = self._turn_times.pop(user_item, time.perf_counter())
        task = asyncio.get_running_loop().create_task(self._run_response(run))
        self._runs[run.generation] = (run, task)
        await self._act(actions)

    async def _run_response(self, run: ResponseRun) -> None:
        """Response `run` as its own task; then what the turn state says comes next."""
        generation = run.generation
        context = ResponseContext(
            send=lambda event, audio_ms: self.send(event, generation=generation,
                                                   audio_ms=audio_ms),
            conversation=self.conversation,
            replies=lambda: self._reply_events(run.config),
            rate_limits=await self.rate_limits(),
            sent_audio_ms=lambda: self.outbox.sent_audio_ms(generation),
            on_first_audio=lambda: self._first_audio(generation))
        try:
            await ResponseWriter(context, run)()
            if self.playback is not None and run.audio and run.status != "cancelled":
                # The listener is still hearing it: the floor is the response's until the
                # playing ends (so talking over it is a barge-in, as during generation).
                await self.playback.drained(run.id)
        finally:  # whatever happened, the floor is free for the next response
            actions = self.turns.response_finished(
                generation, server_calls=bool(self._server_calls(run)))
            self._finished(run)
        try:
            await self._act(actions)
        finally:
            self._runs.pop(generation, None)

    async def _reply_events(self, config: SessionConfig) -> AsyncGenerator[Any, None]:
        await self.ready_to_respond()
        messages = self.conversation.messages(config.instructions)
        async with contextlib.aclosing(self.replies.events(config, messages)) as events:
            async for event in events:
                yield event

    def _first_audio(self, generation: int) -> None:
        self.voice_locked = True
        actions = self.turns.audio_started(generation)
        if actions:
            self._spawn(self._act(actions))

    def _server_calls(self, run: ResponseRun) -> list[dict[str, Any]]:
        """The calls of a completed response that the session runs itself."""
        if run.status != "completed" or not run.in_conversation:
            return []
        names = self.server_tool_names()
        return [c.item for c in run.calls if c.item["name"] in names]

    async def say(self, text: str) -> None:
        """Speak `text` as the assistant, word for word (a phone call's greeting): a
        response like any other, so it can be talked over."""
        await self.start_response(None, scripted=self.replies.say(self.config, text))

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        try:
            actions = self.turns.cancel(event.get("response_id"))
        except NoActiveResponse:
            raise RealtimeError("Cancellation failed: no active response found",
                                code="response_cancel_not_active",
                                event_id=event.get("event_id")) from None
        await self._act(actions)

    async def _on_output_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        raise RealtimeError("output_audio_buffer.clear applies to WebRTC and SIP sessions; "
                            "over WebSocket send conversation.item.truncate instead",
                            code="unsupported_event", event_id=event.get("event_id"))

    def _finished(self, run: ResponseRun) -> None:
        stages, voice_to_voice = self._turn_latency(run)
        metrics.turn_finished(run.status, stages, voice_to_voice, run.speculative)
        log.info("response %s %s", run.id, run.status, extra={"fields": {
            "event": "turn", "response_id": run.id, "status": run.status,
            "speculative": run.speculative, "voice_to_voice_ms": voice_to_voice,
            **{f"{stage}_ms": ms for stage, ms in stages.items()}}})
        if self.config.debug_events and run.first_audio_at is not None:
            self._spawn(self.send(server_event(
                "parley.turn.latency", response_id=run.id,
                item_id=run.message["id"] if run.message else None, stages_ms=stages,
                voice_to_voice_ms=voice_to_voice, speculative=run.speculative),
                generation=run.generation))

    async def rate_limits(self) -> list[dict[str, Any]]:
        """What is left of the key's request limit now, as every replica counts it
        (agent.limits); empty where the server sets none. (OpenAI's event names only
        requests and tokens: the session limit is not reported here.)"""
        key_scope = scope_of(self.api_key, self.settings) if self.settings.keys else None
        limit = None if key_scope is None else key_scope.requests_per_minute
        if (self.settings.rate_limit_requests_per_minute if limit is None else limit) <= 0:
            return []
        limits = Limits(self.runtime.store, self.settings)
        left = await limits.requests_left(key_fingerprint(self.api_key), limit)
        return [] if left is None else [left.rate_limit("requests")]

    # -- tools --------------------------------------------------------------------------------

    def _call_context(self) -> CallContext:
        messages = self.conversation.messages("")
        return CallContext(session_id=f"realtime:{self.conversation.id}", api_key=self.api_key,
                           confirmed=confirmed_in_chat(messages), keypad=_keypad(messages))

    def server_tool_names(self) -> frozenset[str]:
        """The dispatcher's tools this session runs itself: with `parley.server_tools`
        true, or unset and the API key listed in the tools config's `execute_keys`."""
        wanted = self.config.server_tools
        if wanted is None:
            keys = self.runtime.tools_config.execute_keys if self.runtime.tools_config else ()
            wanted = "*" in keys or (self.api_key is not None and self.api_key in keys) or \
                executes_tools(self.api_key, self.settings)
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
        if names and self.dispatcher is not None:
            tools += [t for t in self.dispatcher.openai_tools(self._call_context())
                      if t["function"]["name"] in names]
        return tools

    async def _run_tools(self, calls: list[dict[str, Any]], generation: int) -> None:
        """Run response `generation`'s server-side calls and add their outputs (sent after
        that response's events); the turn state decides whether a follow-up answers them.
        A call that started runs to the end and is recorded even if the user interrupts."""
        try:
            await self._execute_calls(calls, generation)
        finally:
            actions = self.turns.tools_done()
        await self._act(actions)

    async def _execute_calls(self, calls: list[dict[str, Any]], generation: int | None
                             ) -> None:
        assert self.dispatcher is not None
        context = self._call_context()
        results = await asyncio.gather(*(
            self.dispatcher.execute(call_from_item(c), context) for c in calls))
        for result in results:
            item = {"id": new_item_id(), "object": "realtime.item", "status": "completed",
                    **function_call_output_item(result)}
            previous = await self.conversation.add(item)
            for kind in ("conversation.item.added", "conversation.item.done"):
                await self.send(server_event(kind, previous_item_id=previous, item=item),
                                generation=generation)

    def _unanswered_server_calls(self) -> list[dict[str, Any]]:
        """Server-side calls in the conversation without an output: a replica that ran them
        died before it could add one."""
        answered = {i.get("call_id") for i in self.conversation.items
                    if i.get("type") == "function_call_output"}
        names = self.server_tool_names()
        return [i for i in self.conversation.items if i.get("type") == "function_call"
                and i.get("call_id") not in answered and i.get("name") in names]

    async def _finish_unanswered_calls(self, calls: list[dict[str, Any]]) -> None:
        """Carry on a resumed conversation's unanswered server calls. The call records
        decide, whichever replica asks: a finished call gives its recorded result, one
        still running is waited for (and reported in doubt if its runner died), and one
        that never started runs now — none runs twice. The outputs join the conversation;
        the client asks for the answer as usual."""
        log.warning("conversation %s resumed with %d unanswered server tool call(s): %s",
                    self.conversation.id, len(calls), [c.get("call_id") for c in calls])
        await self._execute_calls(calls, None)

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
        if self.turns.response is None:
            self._spawn(self.replies.prefill(self.config, self.conversation.items),
                        before_responses=True)

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

    def _reap(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("realtime session task failed", exc_info=task.exception())


KEYPAD_PREFIX = "DTMF: "  # how keypad input reads in the conversation (agent.phone.media)


def _keypad(messages: list[dict[str, Any]]) -> str | None:
    """The digits of the user's latest turn, when it was keypad input."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    text = last.get("content") if last else None
    if isinstance(text, str) and text.startswith(KEYPAD_PREFIX):
        return text[len(KEYPAD_PREFIX):]
    return None


def _ms(later: float | None, earlier: float | None) -> int | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000)


def _error_event(exc: Exception, event_id: str | None) -> dict[str, Any]:
    return error_event(client_error(exc) or ParleyError("internal server error"), event_id)
