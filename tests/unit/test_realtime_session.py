"""The realtime session as a protocol adapter, on fake engines: a VAD that hears loud
frames, an ASR that knows the words, and a reply source that speaks for as long as it is
read. Turn-taking, barge-in with a client that stopped reading, the backchannel rule and
closing with a full outbox run here in milliseconds; tests/e2e/test_realtime.py runs the
same paths on the real models."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from agent.chat.pipeline import AudioData, ChoiceDone, TextDelta
from agent.config import Settings
from agent.realtime.conversation import Conversation
from agent.realtime.session import Session
from agent.realtime.session_config import SessionConfig, default_session
from agent.realtime.turns import Phase
from agent.runtime import Runtime
from agent.speech.transcript import Transcript

WIRE_RATE = 24_000
PCM_PER_MS = WIRE_RATE * 2 // 1000
CHUNK_MS = 100


class LoudFramesVad:
    """Speech wherever a frame is loud."""

    def score(self, frame: np.ndarray, context: np.ndarray, state: np.ndarray
              ) -> tuple[float, np.ndarray]:
        return (0.95 if float(np.abs(frame).mean()) > 0.05 else 0.01), state


class KnownWordsAsr:
    def __init__(self, text: str = "where is my order"):
        self.text = text

    def resolve_language(self, language: str | None) -> str | None:
        return language

    async def transcribe_async(self, audio: np.ndarray, **_: Any) -> Transcript:
        return Transcript(text=self.text, language="en", duration=len(audio) / 16_000)

    async def transcribe_partial_async(self, audio: np.ndarray, **_: Any) -> None:
        return None


class Talker:
    """Replies of `pieces` 100 ms audio clauses (each with a word), forever if None."""

    def __init__(self, pieces: int | None):
        self.pieces = pieces
        self.started = 0
        self.closed = 0

    async def events(self, config: SessionConfig, messages: list[dict[str, Any]], *,
                     max_tokens: int | None = None, audio: bool = True,
                     ) -> AsyncGenerator[Any, None]:
        self.started += 1
        try:
            n = 0
            while self.pieces is None or n < self.pieces:
                yield TextDelta(0, f"word{n} ")
                if audio:
                    yield AudioData(0, bytes(CHUNK_MS * PCM_PER_MS))
                n += 1
                await asyncio.sleep(0)
            yield ChoiceDone(0, "stop", "", None, 0.0, 10, 0, n)
        finally:
            self.closed += 1

    async def prefill(self, config: SessionConfig, items: list[dict[str, Any]],
                      heard: str | None = None) -> None:
        return None

    async def say(self, config: SessionConfig, text: str) -> AsyncGenerator[Any, None]:
        yield TextDelta(0, text)
        yield AudioData(0, bytes(CHUNK_MS * PCM_PER_MS))
        yield ChoiceDone(0, "stop", text, None, 0.1, 0, 0, 0)


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Any] = {}

    async def put_json(self, kind: str, key: str, value: Any, ttl_s: float | None = None
                       ) -> None:
        self.data[kind, key] = json.loads(json.dumps(value))

    async def get_json(self, kind: str, key: str) -> Any:
        return self.data.get((kind, key))

    async def put_blob(self, kind: str, key: str, value: bytes, ttl_s: float | None = None
                       ) -> None:
        self.data[kind, key] = value

    async def get_blob(self, kind: str, key: str) -> bytes | None:
        return self.data.get((kind, key))


class Scheduler:
    def __init__(self) -> None:
        self.released: list[str] = []

    async def release(self, session: str) -> None:
        self.released.append(session)


def make_session(replies: Talker, *, send_queue: int = 512, **settings: Any
                 ) -> tuple[Session, Scheduler]:
    config = Settings(realtime_send_queue=send_queue, **settings)
    scheduler = Scheduler()

    async def get_scheduler(target: Any) -> Scheduler:
        return scheduler

    runtime = cast(Runtime, SimpleNamespace(settings=config, tools_config=None,
                                            scheduler=get_scheduler))
    conversation = Conversation("conv_test", cast(Any, MemoryStore()), 60)
    session = Session(runtime, default_session(config, "gpt-realtime"), conversation,
                      beta=False, api_key=None, vad_model=LoudFramesVad(),
                      asr=KnownWordsAsr(), dispatcher=None, replies=replies)
    return session, scheduler


def tone(ms: int) -> bytes:
    t = np.arange(WIRE_RATE * ms // 1000) / WIRE_RATE
    return (np.sin(2 * np.pi * 220 * t) * 0.5 * 32767).astype("<i2").tobytes()


def quiet(ms: int) -> bytes:
    return bytes(WIRE_RATE * ms // 1000 * 2)


async def say(session: Session, audio: bytes) -> None:
    """Append `audio` in 100 ms chunks, as a microphone sends it (no pacing needed: the
    VAD counts samples, not wall time)."""
    step = CHUNK_MS * PCM_PER_MS
    for at in range(0, len(audio), step):
        await session.handle(json.dumps({
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(audio[at:at + step]).decode()}))


async def read_all(session: Session) -> list[dict[str, Any]]:
    """Everything queued for the client right now."""
    out = []
    while session.outbox.qsize():
        event = await session.outbox.get()
        assert event is not None
        out.append(event)
    return out


async def read_until(session: Session, kind: str, seen: list[dict[str, Any]],
                     timeout: float = 5) -> dict[str, Any]:
    async def loop() -> dict[str, Any]:
        while True:
            event = await session.outbox.get()
            assert event is not None
            seen.append(event)
            if event["type"] == kind:
                return event
    return await asyncio.wait_for(loop(), timeout)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


@pytest.fixture
async def session_factory():
    made: list[Session] = []

    def factory(replies: Talker, **kwargs: Any) -> tuple[Session, Scheduler]:
        session, scheduler = make_session(replies, **kwargs)
        made.append(session)
        return session, scheduler

    yield factory
    for session in made:
        session.outbox.close()
        await session.close()


async def test_a_spoken_turn_is_answered_and_the_floor_comes_back(session_factory) -> None:
    talker = Talker(pieces=3)
    session, _ = session_factory(talker)
    await session.start()
    seen: list[dict[str, Any]] = []
    await say(session, quiet(300) + tone(800) + quiet(700))
    done = await read_until(session, "response.done", seen)
    assert done["response"]["status"] == "completed"
    kinds = types(seen)
    assert kinds.index("input_audio_buffer.speech_started") < \
        kinds.index("input_audio_buffer.speech_stopped") < \
        kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert kinds.count("response.output_audio.delta") == 3
    await asyncio.wait_for(_until(lambda: session.turns.phase is Phase.LISTENING), 1)
    assert talker.closed == talker.started  # every pipeline it opened was closed


async def test_a_stalled_reader_that_talks_over_an_answer_gets_none_of_its_held_audio(
        session_factory) -> None:
    talker = Talker(pieces=None)  # an answer that never ends by itself
    session, _ = session_factory(talker)
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    seen: list[dict[str, Any]] = []
    await read_until(session, "response.output_audio.delta", seen)
    # The client stops reading: the answer runs a second ahead of what was sent, no more.
    await asyncio.wait_for(_until(lambda: session.outbox._queued_audio_ms >= 1000), 2)
    queued_ms = session.outbox._queued_audio_ms
    assert queued_ms <= 1100
    await say(session, tone(600) + quiet(700))  # talks over it, long enough to mean it
    after = await read_all(session)
    while "response.done" not in types(after):
        after += [await asyncio.wait_for(session.outbox.get(), 2)]  # type: ignore[list-item]
    kinds = types(after)
    assert kinds[0] == "input_audio_buffer.speech_started"
    stale = kinds.count("response.output_audio.delta") * CHUNK_MS
    assert stale == 0, f"{stale} ms of the cancelled answer's audio after speech_started"
    done = next(e for e in after if e["type"] == "response.done")
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    # The item keeps only what was sent before the cut.
    item = done["response"]["output"][0]
    assert item["status"] == "incomplete"
    assert len(item["content"][0]["transcript"].split()) <= 1
    assert talker.closed == 1


async def test_a_backchannel_leaves_the_answer_running_and_its_audio_flows_again(
        session_factory) -> None:
    talker = Talker(pieces=None)
    session, _ = session_factory(talker, realtime_speculate=False)
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    seen: list[dict[str, Any]] = []
    await read_until(session, "response.output_audio.delta", seen)
    await say(session, tone(200))  # "uh-huh": under the backchannel threshold
    assert session.turns.phase is Phase.OVERLAP
    await say(session, quiet(700))
    assert session.turns.phase is Phase.SPEAKING
    after: list[dict[str, Any]] = []
    await read_until(session, "response.output_audio.delta", after)
    assert "input_audio_buffer.committed" not in types(after)
    await session.handle(json.dumps({"type": "response.cancel"}))
    done = await read_until(session, "response.done", after)
    assert done["response"]["status_details"]["reason"] == "client_cancelled"


async def test_a_second_response_is_refused_while_one_runs(session_factory) -> None:
    session, _ = session_factory(Talker(pieces=None))
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    await session.handle(json.dumps({"type": "response.create", "event_id": "evt_2"}))
    seen: list[dict[str, Any]] = []
    error = await read_until(session, "error", seen)
    assert error["error"]["code"] == "conversation_already_has_active_response"
    assert error["error"]["event_id"] == "evt_2"


async def test_closing_with_a_full_outbox_stops_the_answer_and_frees_the_slot(
        session_factory) -> None:
    talker = Talker(pieces=None)
    session, scheduler = session_factory(talker, send_queue=4)
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    await asyncio.wait_for(_until(lambda: session.outbox.qsize() >= 4), 2)
    session.outbox.close()
    await asyncio.wait_for(session.close(), 2)
    assert scheduler.released == [session.decoder_session]
    assert talker.closed == talker.started == 1


async def _until(condition: Any) -> None:
    """Let the session's tasks run, step by step, until `condition` holds (the callers
    bound it with a timeout). The fakes never wait on a clock, so no time passes."""
    while not condition():
        await asyncio.sleep(0)


class FarEndPlayback:
    """A listener whose playback the server knows (as the phone bridge knows it): it
    has heard `played_ms` of each item and will not finish by itself."""

    def __init__(self, played_ms: int):
        self.played = played_ms
        self.stopped: list[str] = []
        self._stop = asyncio.Event()

    async def drained(self, response_id: str) -> None:
        await self._stop.wait()

    def stop(self, response_id: str) -> None:
        self.stopped.append(response_id)
        self._stop.set()

    def played_ms(self, item_id: str) -> int | None:
        return self.played


async def test_talking_over_an_answer_still_playing_stops_it_and_keeps_what_was_heard(
        session_factory) -> None:
    """The answer is fully generated and sent, but the listener has heard 200 ms of it:
    the floor is still the answer's, so talking over it barges in, stops the playing
    and cuts the item to those 200 ms."""
    talker = Talker(pieces=5)
    session, _ = session_factory(talker, realtime_speculate=False)
    playback = FarEndPlayback(played_ms=200)
    session.playback = playback
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    seen: list[dict[str, Any]] = []
    done = await read_until(session, "response.done", seen)
    assert done["response"]["status"] == "completed"
    assert session.turns.phase is Phase.SPEAKING  # still playing at the far end
    item_id = done["response"]["output"][0]["id"]
    await say(session, tone(800) + quiet(700))
    after = await read_all(session)
    assert playback.stopped == [done["response"]["id"]]
    truncated = next(e for e in after if e["type"] == "conversation.item.truncated")
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 200)
    assert len(await session.conversation.audio(item_id) or b"") == 200 * PCM_PER_MS
    assert session.conversation.get(item_id)["content"][0]["transcript"] == "word0 word1"


async def test_keypad_input_is_what_the_tools_see_as_the_latest_turn(session_factory) -> None:
    session, _ = session_factory(Talker(pieces=1))
    for text in ("my order", "DTMF: 4711"):
        await session.handle(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]}}))
    assert session._call_context().keypad == "4711"
    await session.handle(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "ok"}]}}))
    assert session._call_context().keypad is None


async def test_wind_up_lets_the_answer_in_progress_finish(session_factory) -> None:
    """What a draining server waits for: the response running now, to its end."""
    import time

    session, _ = session_factory(Talker(pieces=30))
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    seen: list[dict[str, Any]] = []
    reader = asyncio.ensure_future(read_until(session, "response.done", seen))
    await asyncio.wait_for(session.wind_up(time.monotonic() + 5), 2)
    assert not session._runs
    done = await asyncio.wait_for(reader, 2)
    assert done["response"]["status"] == "completed"
    assert types(seen).count("response.output_audio.delta") == 30


async def test_wind_up_gives_up_at_its_deadline(session_factory) -> None:
    import time

    session, _ = session_factory(Talker(pieces=None))   # an answer that never ends
    await session.start()
    await session.handle(json.dumps({"type": "response.create"}))
    drain = asyncio.ensure_future(read_all(session))
    started = time.monotonic()
    await asyncio.wait_for(session.wind_up(started + 0.05), 2)
    assert time.monotonic() - started < 1 and session._runs   # still running: closed next
    drain.cancel()
