"""GET /twilio/media (WebSocket): a Twilio Media Stream, bridged to a realtime session.

    Twilio ── connected, start (token) ──► check the stream token, open the session
          ── media (µ-law 8 kHz) ────────► input_audio_buffer.append (no resampling: the
                                            session's input format is audio/pcmu)
          ── mark ───────────────────────► MarkLedger: what the caller has heard
          ── dtmf ───────────────────────► digits grouped → a user message, then a reply
          ── stop ───────────────────────► the session closes
          ◄── media + mark ──────────────── response.output_audio.delta (µ-law 8 kHz out)
          ◄── clear ─────────────────────── the turn state barged in (MarkLedger.stop)

Each call is a realtime session like any other (the same turn state machine, tools and
Redis state) whose conversation id is the CallSid, so a stream that reconnects carries the
conversation on, on any replica. Twilio's messages are checked against
schemas/twilio/media_stream.json; one that fails is logged and dropped, and the call goes
on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from agent import logs
from agent.config import Settings
from agent.errors import ParleyError
from agent.json_schema import make_validator, schema
from agent.lifecycle import CLOSE_RESTART, Lifecycle
from agent.model_ids import resolve_model
from agent.phone import tokens
from agent.phone.playback import MarkLedger
from agent.realtime.conversation import Conversation
from agent.realtime.protocol import RealtimeError
from agent.realtime.session import KEYPAD_PREFIX, Session
from agent.realtime.session_config import apply_update, default_session
from agent.runtime import Runtime

log = logging.getLogger(__name__)
MODEL = "gpt-realtime"
CLOSE_POLICY = 1008           # a stream without a valid token
START_TIMEOUT_S = 10.0        # Twilio sends `start` right after `connected`
MULAW_BYTES_PER_MS = 8
NUMBER_KEYS = frozenset({"instructions", "voice", "greeting"})


@functools.cache
def _inbound() -> Any:
    """A validator of what Twilio sends (the schema's `inbound` branch)."""
    return make_validator({**schema("twilio/media_stream"),
                           "oneOf": [{"$ref": "#/$defs/inbound"}]})


def inbound_problem(message: Any) -> str | None:
    """Why `message` is not a Twilio Media Streams message (None when it is one)."""
    error = next(iter(_inbound().iter_errors(message)), None)
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path) or "message"
    return f"{where}: {error.message}"


async def twilio_media(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    secret = runtime.settings.twilio_auth_token
    if not secret:
        await websocket.close(CLOSE_POLICY)  # before accepting: the handshake gets a 403
        return
    if websocket.app.state.lifecycle.draining:
        await websocket.close(CLOSE_RESTART)  # a stream that starts now would be cut short
        return
    await websocket.accept()
    start = await _start_message(websocket)
    if start is None:
        await websocket.close(CLOSE_POLICY)
        return
    details = start["start"]
    parameters = details.get("customParameters") or {}
    try:
        await tokens.redeem(runtime.store, secret, parameters.get("token", ""),
                            details["callSid"])
    except tokens.TokenRefused as exc:
        log.warning("twilio stream %s refused: %s", start["streamSid"], exc)
        await websocket.close(CLOSE_POLICY)
        return
    except ParleyError as exc:  # the store is down: the call cannot be checked
        log.error("twilio stream %s: %s", start["streamSid"], exc)
        await websocket.close(1011)
        return
    # A call is not cut short by a drain: it keeps the process until it ends or the
    # grace period does (Twilio does not reconnect a stream by itself).
    lifecycle: Lifecycle = websocket.app.state.lifecycle
    handle = lifecycle.session_opened(_stay_on_the_line)
    logs.session_id.set(start["streamSid"])
    logs.conversation_id.set(details["callSid"])    # a call's conversation id is its CallSid
    try:
        await PhoneCall(websocket, runtime, start["streamSid"], details["callSid"],
                        parameters).run()
    finally:
        await lifecycle.session_closed(handle)


async def _stay_on_the_line(deadline: float) -> None:
    """A draining server's wind-up for a phone call: nothing; the call goes on."""


async def _start_message(websocket: WebSocket) -> dict[str, Any] | None:
    """Twilio's `start` (after `connected`); None if the stream does not send one."""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                message = _parse(await websocket.receive_text())
                if message is not None and message["event"] == "start":
                    return message
    except (TimeoutError, WebSocketDisconnect, RuntimeError, KeyError):
        return None


def _parse(raw: str) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        log.error("twilio stream: a message that is not JSON: %.200r", raw)
        return None
    problem = inbound_problem(message)
    if problem is not None:
        log.error("twilio stream: malformed %s message (%s)",
                  message.get("event") if isinstance(message, dict) else "?", problem)
        return None
    return message


def call_settings(settings: Settings, called: str | None) -> dict[str, str | None]:
    """Instructions, voice and greeting for a call to number `called`: the number's own
    entry in [twilio.numbers], over the PARLEY_TWILIO_* settings."""
    own = settings.twilio_numbers.get(called or "", {})
    unknown = set(own) - NUMBER_KEYS
    if unknown:
        log.warning("twilio number %s: unknown settings %s ignored", called, sorted(unknown))
    return {"instructions": own.get("instructions", settings.twilio_instructions),
            "voice": own.get("voice", settings.twilio_voice),
            "greeting": own.get("greeting", settings.twilio_greeting)}


class PhoneCall:
    def __init__(self, websocket: WebSocket, runtime: Runtime, stream_sid: str,
                 call_sid: str, parameters: dict[str, str]):
        self.websocket = websocket
        self.runtime = runtime
        self.settings = runtime.settings
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.parameters = parameters
        self.ledger = MarkLedger(self._clear)
        self._sending = asyncio.Lock()
        self._digits = ""
        self._digit_timer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def _open_session(self, wanted: dict[str, str | None]) -> Session:
        settings, runtime = self.settings, self.runtime
        served = resolve_model(MODEL, settings, "chat")
        config = default_session(settings, MODEL)
        output: dict[str, Any] = {"format": {"type": "audio/pcmu"}}
        if wanted["voice"]:
            output["voice"] = wanted["voice"]
        update: dict[str, Any] = {
            "type": "realtime", "max_output_tokens": settings.twilio_max_output_tokens,
            "audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": output},
            "parley": {"server_tools": settings.twilio_server_tools}}
        if wanted["instructions"]:
            update["instructions"] = wanted["instructions"]
        config = apply_update(config, update)
        ttl = settings.realtime_state_ttl_s
        try:  # the same call again (a stream that reconnected): carry the conversation on
            conversation = await Conversation.resume(self.call_sid, runtime.store, ttl)
        except RealtimeError:
            conversation = Conversation(self.call_sid, runtime.store, ttl)
        vad, asr, dispatcher = await asyncio.gather(runtime.vad(), runtime.asr(),
                                                    runtime.dispatcher())
        await runtime.scheduler(served.target)
        await runtime.tts()
        return Session(runtime, config, conversation, beta=False, api_key=None,
                       vad_model=vad, asr=asr, dispatcher=dispatcher, playback=self.ledger)

    async def run(self) -> None:
        wanted = call_settings(self.settings, self.parameters.get("to"))
        try:
            session = await self._open_session(wanted)
        except (ParleyError, RealtimeError) as exc:
            log.error("twilio call %s: the session could not open: %s", self.call_sid, exc)
            await self.websocket.close(1011)
            return
        writer = asyncio.create_task(self._write(session))
        try:
            await session.start()
            if wanted["greeting"] and not session.conversation.items:
                await session.say(wanted["greeting"])
            await self._read(session)
        except WebSocketDisconnect:
            pass
        finally:
            session.outbox.close()
            if self._digit_timer is not None:
                self._digit_timer.cancel()
            await session.close()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            with contextlib.suppress(Exception):
                await self.websocket.close()

    # -- from Twilio ------------------------------------------------------------------------

    async def _read(self, session: Session) -> None:
        while True:
            raw = await self.websocket.receive_text()
            message = _parse(raw)
            if message is None:
                continue
            kind = message["event"]
            if kind == "media":
                if message["media"]["track"] == "inbound":
                    await session.handle(json.dumps({
                        "type": "input_audio_buffer.append",
                        "audio": message["media"]["payload"]}))
            elif kind == "mark":
                self.ledger.echoed(message["mark"]["name"])
            elif kind == "dtmf":
                self._digit(session, message["dtmf"]["digit"])
            elif kind == "stop":
                log.info("twilio call %s: stream stopped", self.call_sid)
                return

    def _digit(self, session: Session, digit: str) -> None:
        """Keypad digits: those pressed within the inter-digit timeout of one another
        form one input; `#` ends it at once."""
        if self._digit_timer is not None:
            self._digit_timer.cancel()
        if digit != "#":
            self._digits += digit
        delay = 0.0 if digit == "#" else self.settings.twilio_dtmf_timeout_ms / 1000
        self._digit_timer = asyncio.create_task(self._digits_after(session, delay))

    async def _digits_after(self, session: Session, delay: float) -> None:
        await asyncio.sleep(delay)  # the inter-digit timeout itself, not a synchronisation
        digits, self._digits = self._digits, ""
        if not digits:
            return
        await session.handle(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": KEYPAD_PREFIX + digits}]}}))
        if session.turns.response is not None:
            await session.handle(json.dumps({"type": "response.cancel"}))
        await session.handle(json.dumps({"type": "response.create"}))

    # -- to Twilio --------------------------------------------------------------------------

    async def _write(self, session: Session) -> None:
        while (event := await session.outbox.get()) is not None:
            kind = event["type"]
            if kind == "response.output_audio.delta":
                response_id, item_id = event["response_id"], event["item_id"]
                if not await self.ledger.room(response_id):
                    continue  # the caller barged in while this waited
                payload = event["delta"]
                ms = len(base64.b64decode(payload)) // MULAW_BYTES_PER_MS
                mark = self.ledger.sent(response_id, item_id, ms)
                await self._send({"event": "media", "streamSid": self.stream_sid,
                                  "media": {"payload": payload}})
                await self._send({"event": "mark", "streamSid": self.stream_sid,
                                  "mark": {"name": mark}})
            elif kind == "error":
                log.warning("twilio call %s: %s", self.call_sid, event["error"]["message"])

    def _clear(self, response_id: str) -> None:
        """The ledger stopped a response still playing: Twilio drops its queued audio."""
        task = asyncio.get_running_loop().create_task(
            self._send({"event": "clear", "streamSid": self.stream_sid}))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._sending:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await self.websocket.send_text(json.dumps(message, separators=(",", ":")))
