"""Realtime sessions at GET /v1/realtime, end to end: the official SDK's realtime client (and
raw websockets for the beta names) against a real `parley serve` with its real models.

Every server event a GA client receives here is checked against
schemas/realtime/server_events.json as it arrives. Spoken input is the recorded question
(tests/fixtures/question_capital_of_france.wav) sent at real-time pace in 100 ms chunks and
followed by silence, as a microphone sends it. Where audio input is not the point, the user
speaks in text items and answers are kept short, so the module stays quick on a small CPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import difflib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import websockets

from agent.audio import decode_audio, encode_audio
from agent.realtime.protocol import validate_server_event
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.slow

MODEL = "gpt-realtime"
QUESTION = Path(__file__).parents[1] / "fixtures" / "question_capital_of_france.wav"
RATE = 24_000                 # audio/pcm on the wire: 16-bit mono at 24 kHz
PCM_BYTES_PER_MS = RATE * 2 // 1000
CHUNK_MS = 100
TRANSCRIBE = {"model": "whisper-1"}
# Greedy answers, so a test does not hinge on one sampled word.
SHORT = {"temperature": 0, "max_output_tokens": 40}
STORY = "Tell me a long story about a lighthouse keeper."
WEATHER_TOOL = {
    "type": "function", "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "City name"},
                                  "unit": {"type": "string",
                                           "enum": ["celsius", "fahrenheit"]}}}}


# -- audio ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def question() -> np.ndarray:
    """The recorded question as float32 samples at 24 kHz."""
    return decode_audio(QUESTION.read_bytes(), rate=RATE)


def pcm16(samples: np.ndarray) -> bytes:
    return encode_audio(samples, RATE, "pcm16")


def spoken(samples: np.ndarray, silence_s: float = 1.5) -> bytes:
    """What a microphone sends for one utterance: the speech, then the quiet after it."""
    return pcm16(samples) + bytes(int(RATE * silence_s) * 2)


def speech_onset(samples: np.ndarray, rate: int = RATE) -> int:
    """The first sample of the first 10 ms frame loud enough to be speech."""
    frame = rate // 100
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.02)
    assert len(loud), "the fixture has no speech"
    return int(loud[0]) * frame


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def stream(conn: Any, audio: bytes, *, chunk: int = CHUNK_MS * PCM_BYTES_PER_MS,
                 pace: float = CHUNK_MS / 1000) -> None:
    """Append `audio` in pieces of `chunk` bytes, one every `pace` seconds of wall clock
    (0: as fast as the socket takes them)."""
    began = time.monotonic()
    for n, at in enumerate(range(0, len(audio), chunk)):
        await conn.input_audio_buffer.append(audio=b64(audio[at:at + chunk]))
        if pace:
            await asyncio.sleep(max(0.0, began + (n + 1) * pace - time.monotonic()))


def words(text: str | None) -> list[str]:
    return re.findall(r"[a-z0-9']+", (text or "").lower())


# -- events -----------------------------------------------------------------------------------

class Events:
    """The server events of one connection, in order, each kept once read. GA events are
    checked against the server event schema as they arrive."""

    def __init__(self, recv: Callable[[], Awaitable[str | bytes]], *, validate: bool = True):
        self._recv = recv
        self.validate = validate
        self.seen: list[dict[str, Any]] = []

    async def until(self, kind: str | tuple[str, ...],
                    match: Callable[[dict[str, Any]], bool] | None = None,
                    *, timeout: float = 60) -> dict[str, Any]:
        """Read on until an event of type `kind` (or one of them) for which `match` holds
        arrives. An `error` event on the way fails the test unless `kind` is "error"."""
        kinds = (kind,) if isinstance(kind, str) else kind
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                event = json.loads(await asyncio.wait_for(self._recv(), left))
            except TimeoutError:
                pytest.fail(f"no {kind} within {timeout} s; the last events were "
                            f"{self.kinds()[-15:]}")
            if self.validate:
                validate_server_event(event)
            self.seen.append(event)
            if event["type"] in kinds and (match is None or match(event)):
                return event
            if event["type"] == "error":
                pytest.fail(f"unexpected error while waiting for {kind}: {event['error']}")

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.seen]

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.seen
                if e["type"] == kind and all(e.get(k) == v for k, v in fields.items())]

    def index(self, event: dict[str, Any]) -> int:
        return next(n for n, e in enumerate(self.seen) if e is event)


def sdk_client(server: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


@contextlib.asynccontextmanager
async def realtime(server: str, *, query: dict[str, str] | None = None,
                   **session: Any) -> AsyncIterator[tuple[Any, Events]]:
    """An SDK realtime connection with `session` applied, and its events."""
    manager = sdk_client(server).realtime.connect(model=MODEL, extra_query=query or {})
    async with manager as conn:
        events = Events(conn.recv_bytes)
        await events.until("session.created")
        await events.until("conversation.created")
        if session:
            await conn.session.update(session={"type": "realtime", **session})
            await events.until("session.updated")
        yield conn, events


def user_text(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def for_response(response_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["response"]["id"] == response_id


def message_of(done: dict[str, Any]) -> dict[str, Any]:
    """The assistant message item in a response.done."""
    messages = [i for i in done["response"]["output"] if i["type"] == "message"]
    assert messages, f"no message in {done['response']['output']}"
    return messages[0]


def said(item: dict[str, Any]) -> str:
    """The words of a message item: its audio's transcript, or its text."""
    part = item["content"][0]
    return part.get("transcript") if part["type"].endswith("audio") else part.get("text")


def audio_of(events: Events, response_id: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"])
                    for e in events.of("response.output_audio.delta", response_id=response_id))


# -- a spoken turn ---------------------------------------------------------------------------

async def test_spoken_question_gets_a_spoken_answer(server, question, asr):
    async with realtime(server, audio={"input": {"transcription": TRANSCRIBE}}, **SHORT) \
            as (conn, events):
        sender = asyncio.create_task(stream(conn, spoken(question)))
        done = await events.until("response.done", timeout=120)
        await sender

    started = events.of("input_audio_buffer.speech_started")
    stopped = events.of("input_audio_buffer.speech_stopped")
    committed = events.of("input_audio_buffer.committed")
    assert len(started) == len(stopped) == len(committed) == 1, events.kinds()
    item_id = committed[0]["item_id"]
    assert started[0]["item_id"] == stopped[0]["item_id"] == item_id
    assert events.index(started[0]) < events.index(stopped[0]) < events.index(committed[0])
    # The turn's times are times in the audio sent: it ends inside the quiet after it.
    speech_ms = len(question) * 1000 // RATE
    assert 0 <= started[0]["audio_start_ms"] < stopped[0]["audio_end_ms"] <= speech_ms + 1500

    transcribed = events.of("conversation.item.input_audio_transcription.completed")
    assert [t["item_id"] for t in transcribed] == [item_id]
    assert {"capital", "france"} <= set(words(transcribed[0]["transcript"]))

    response = done["response"]
    assert response["status"] == "completed", response
    usage = response["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    item = message_of(done)
    transcript = said(item)
    assert "paris" in words(transcript)
    deltas = events.of("response.output_audio_transcript.delta", item_id=item["id"])
    assert "".join(d["delta"] for d in deltas) == transcript

    # The audio says the transcript: as long as its words take to speak, and the words
    # the ASR hears in it are the transcript's.
    audio = audio_of(events, response["id"])
    seconds = len(audio) / (RATE * 2)
    assert 0.15 * len(words(transcript)) <= seconds <= 1.0 * len(words(transcript)) + 1.0
    heard = asr.transcribe(decode_audio(audio, "pcm16", rate=16_000)).text
    assert "paris" in words(heard)
    # Letters, not words: the ASR may hear "France is" as "Francis".
    letters = ["".join(words(t)) for t in (transcript, heard)]
    assert difflib.SequenceMatcher(None, *letters).ratio() >= 0.8, (transcript, heard)


async def test_a_pause_mid_sentence_is_not_a_turn_and_the_held_reply_is_used(server, question):
    """A 300 ms breath inside the question (shorter than the 500 ms end-of-turn silence):
    whatever reply was started speculatively in it is dropped unseen; the one reply answers
    the whole question, and it was started in the final silence (`speculative`)."""
    onset = speech_onset(question)
    frame = RATE // 100
    speech = question[onset:]
    # The quietest 10 ms frame in the middle third: a gap between words.
    middle = speech[len(speech) // 3: 2 * len(speech) // 3]
    frames = middle[: len(middle) // frame * frame].reshape(-1, frame)
    cut = len(speech) // 3 + int(np.argmin((frames ** 2).mean(axis=1))) * frame
    breath = np.zeros(RATE * 3 // 10, dtype=question.dtype)
    audio = np.concatenate([question[:onset], speech[:cut], breath, speech[cut:]])
    async with realtime(server, audio={"input": {"transcription": TRANSCRIBE}},
                        parley={"debug_events": True}, **SHORT) as (conn, events):
        sender = asyncio.create_task(stream(conn, spoken(audio)))
        done = await events.until("response.done", timeout=120)
        latency = await events.until("parley.turn.latency", timeout=30)
        await sender

    assert len(events.of("input_audio_buffer.committed")) == 1, events.kinds()
    assert len(events.of("response.created")) == 1
    committed = events.index(events.of("input_audio_buffer.committed")[0])
    transcribed = events.of("conversation.item.input_audio_transcription.completed")
    assert {"capital", "france"} <= set(words(transcribed[0]["transcript"]))
    # Nothing of a reply reached the client before the turn was over and in words.
    first_response_event = min(n for n, e in enumerate(events.seen)
                               if e["type"].startswith("response."))
    assert first_response_event > events.index(transcribed[0]) > committed
    assert done["response"]["status"] == "completed"
    assert "paris" in words(said(message_of(done)))
    assert latency["response_id"] == done["response"]["id"]
    assert latency["speculative"] is True

    # The same turn in the server's metrics (scraped with the API key, like the API).
    async with httpx.AsyncClient() as http:
        assert (await http.get(server + "/metrics")).status_code == 401
        scraped = (await http.get(server + "/metrics",
                                  headers={"Authorization": f"Bearer {API_KEY}"})).text
    assert metric(scraped, 'parley_realtime_speculations_total{outcome="used"}') >= 1
    assert metric(scraped,
                  'parley_realtime_voice_to_voice_seconds_count{speculative="true"}') >= 1
    assert metric(scraped, 'parley_realtime_stage_seconds_count'
                           '{stage="response_to_first_audio"}') >= 1


def metric(text: str, name: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# -- barge-in --------------------------------------------------------------------------------

async def test_speech_during_an_answer_cancels_it_and_truncates_the_item(server, question):
    async with realtime(server, **SHORT) as (conn, events):
        await conn.conversation.item.create(item=user_text(STORY))
        await conn.response.create(response={"max_output_tokens": 300})
        first = await events.until("response.output_audio.delta", timeout=90)
        story_id, item_id = first["response_id"], first["item_id"]
        await asyncio.sleep(1.0)  # the listener hears a second of the story, then speaks
        sender = asyncio.create_task(stream(conn, spoken(question)))
        done = await events.until("response.done", for_response(story_id), timeout=60)

        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        assert events.of("input_audio_buffer.speech_started")
        # The item keeps only the words the listener can have heard.
        generated = "".join(e["delta"] for e in events.of(
            "response.output_audio_transcript.delta", item_id=item_id))
        item = events.of("response.output_item.done", response_id=story_id)[-1]["item"]
        kept = said(item)
        assert item["id"] == item_id and item["status"] == "incomplete"
        assert 0 < len(kept.split()) < len(generated.split()), (kept, generated)
        assert generated.split()[: len(kept.split())] == kept.split()
        sent_ms = len(audio_of(events, story_id)) // PCM_BYTES_PER_MS

        # The client says how much it played; more than there is is refused.
        await conn.conversation.item.truncate(item_id=item_id, content_index=0,
                                              audio_end_ms=300)
        truncated = await events.until("conversation.item.truncated")
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 300)
        await conn.conversation.item.truncate(item_id=item_id, content_index=0,
                                              audio_end_ms=sent_ms + 60_000)
        error = (await events.until("error"))["error"]
        assert error["code"] == "invalid_value" and error["param"] == "audio_end_ms"

        # The session lives on: the item reads back cut, and the question is answered.
        await conn.conversation.item.retrieve(item_id=item_id)
        retrieved = (await events.until("conversation.item.retrieved"))["item"]
        part = retrieved["content"][0]
        assert len(base64.b64decode(part["audio"])) == 300 * PCM_BYTES_PER_MS
        assert len(part["transcript"].split()) <= len(kept.split())
        answer = await events.until("response.done", lambda e: e["response"]["id"] != story_id,
                                    timeout=120)
        await sender
    assert answer["response"]["status"] == "completed"
    assert "paris" in words(said(message_of(answer)))
    after = events.seen[events.index(done) + 1:]
    assert not [e for e in after if e.get("response_id") == story_id
                and e["type"].startswith("response.output_audio")]


async def test_a_short_backchannel_does_not_interrupt(server, question):
    onset = speech_onset(question)
    uh_huh = question[onset: onset + RATE * 3 // 10]  # 300 ms of speech
    async with realtime(server, **SHORT) as (conn, events):
        await conn.conversation.item.create(item=user_text(STORY))
        await conn.response.create(response={"max_output_tokens": 150})
        first = await events.until("response.output_audio.delta", timeout=90)
        story_id = first["response_id"]
        await stream(conn, spoken(uh_huh, silence_s=1.0))
        await events.until("input_audio_buffer.speech_stopped", timeout=30)
        assert not events.of("response.done"), "the answer ended before the uh-huh did"
        # The answer goes on after the "uh-huh" (then the listener stops it, to save time).
        more = await events.until(("response.output_audio.delta", "response.done"), timeout=60)
        assert more["type"] == "response.output_audio.delta", more
        await conn.response.cancel()
        done = await events.until("response.done", for_response(story_id), timeout=60)
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    assert events.of("input_audio_buffer.speech_started")
    assert not events.of("input_audio_buffer.committed")  # not a turn of its own


async def test_a_slow_reader_talking_over_an_answer_gets_little_of_it_after_its_speech(
        server, question):
    """The client reads nothing for 5 s while a long answer streams (its socket buffers
    fill, the server's outbox waits), then talks over it: the answer is cut at once, and
    what still arrives of its audio after speech_started is at most a second."""
    onset_s = speech_onset(question) / RATE
    async with realtime(server, **SHORT) as (conn, events):
        await conn.conversation.item.create(item=user_text(STORY))
        await conn.response.create(response={"max_output_tokens": 400})
        first = await events.until("response.output_audio.delta", timeout=90)
        story_id = first["response_id"]
        await asyncio.sleep(5.0)  # a reader that stalls: nothing is read meanwhile
        talking = time.monotonic() + onset_s  # when its voice begins
        sender = asyncio.create_task(stream(conn, spoken(question)))
        started = await events.until("input_audio_buffer.speech_started", timeout=30)
        done = await events.until("response.done", for_response(story_id), timeout=30)
        done_after_s = time.monotonic() - talking
        sender.cancel()
    assert done["response"]["status"] == "cancelled"
    stale = [e for e in events.seen[events.index(started):]
             if e["type"] == "response.output_audio.delta" and e["response_id"] == story_id]
    stale_ms = sum(len(base64.b64decode(e["delta"])) for e in stale) // PCM_BYTES_PER_MS
    assert stale_ms <= 1000, f"{stale_ms} ms of the cancelled answer after speech_started"
    assert done_after_s <= 1.5, f"response.done {done_after_s:.2f} s after the voice began"


# -- manual turns ----------------------------------------------------------------------------

async def test_manual_turns_commit_and_respond_on_request(server, question):
    async with realtime(server, audio={"input": {"turn_detection": None}},
                        output_modalities=["text"], **SHORT) as (conn, events):
        await conn.input_audio_buffer.append(audio=b64(pcm16(question[: RATE // 20])))
        await conn.input_audio_buffer.commit()
        error = (await events.until("error"))["error"]
        assert error["code"] == "input_audio_buffer_commit_empty"
        await conn.input_audio_buffer.clear()
        await events.until("input_audio_buffer.cleared")

        await stream(conn, pcm16(question), pace=0)  # no VAD listens: any pace will do
        await conn.input_audio_buffer.commit()
        committed = await events.until("input_audio_buffer.committed")
        added = await events.until("conversation.item.added")
        assert added["item"]["id"] == committed["item_id"] and added["item"]["role"] == "user"
        assert not events.of("input_audio_buffer.speech_started")
        assert not events.of("response.created")  # nothing answers until asked

        await conn.response.create()
        created = await events.until("response.created")
        await conn.response.create()
        error = (await events.until("error"))["error"]
        assert error["code"] == "conversation_already_has_active_response"
        done = await events.until("response.done", for_response(created["response"]["id"]),
                                  timeout=90)
        assert done["response"]["status"] == "completed"
        assert "paris" in words(said(message_of(done)))  # it answered the spoken words

        await conn.response.cancel()
        error = (await events.until("error"))["error"]
        assert error["code"] == "response_cancel_not_active"


# -- tools -----------------------------------------------------------------------------------

async def test_client_function_call_round_trip(server):
    # A call in the model's own syntax takes some 60 tokens: room for it, and no more.
    async with realtime(server, tools=[WEATHER_TOOL], tool_choice="required",
                        output_modalities=["text"], temperature=0, max_output_tokens=100) \
            as (conn, events):
        await conn.conversation.item.create(
            item=user_text("What is the weather like in Paris right now?"))
        await conn.response.create()
        done = await events.until("response.done", timeout=90)
        assert done["response"]["status"] == "completed"
        call = next(i for i in done["response"]["output"] if i["type"] == "function_call")
        assert call["name"] == "get_weather"
        added = events.of("response.output_item.added")
        assert [a["item"]["type"] for a in added] == ["function_call"]
        pieces = events.of("response.function_call_arguments.delta", item_id=call["id"])
        finished = events.of("response.function_call_arguments.done", item_id=call["id"])
        assert len(finished) == 1 and finished[0]["call_id"] == call["call_id"]
        assert "".join(p["delta"] for p in pieces) == finished[0]["arguments"] \
            == call["arguments"]
        arguments = json.loads(call["arguments"])
        jsonschema.validate(arguments, WEATHER_TOOL["parameters"])
        assert "paris" in arguments["city"].lower()
        # A client tool is the client's to run: the server adds no output of its own.
        assert not [e for e in events.of("conversation.item.added")
                    if e["item"]["type"] == "function_call_output"]

        result = {"city": "Paris", "temperature_c": 18, "conditions": "sunny"}
        await conn.conversation.item.create(item={
            "type": "function_call_output", "call_id": call["call_id"],
            "output": json.dumps(result)})
        await events.until("conversation.item.added",
                           lambda e: e["item"]["type"] == "function_call_output")
        await conn.response.create(response={"tool_choice": "none"})  # answer from it
        answer = await events.until("response.done", lambda e: e["response"]["id"]
                                    != done["response"]["id"], timeout=90)
    assert answer["response"]["status"] in ("completed", "incomplete")
    reply = words(said(message_of(answer)))
    assert "sunny" in reply or "18" in reply, reply


async def test_server_tool_round_trip_books_from_the_real_backend(server):
    day = (datetime.date.today() + datetime.timedelta(days=30)).isoformat()
    async with realtime(server, parley={"server_tools": True},
                        tool_choice={"type": "function", "name": "check_availability"},
                        output_modalities=["text"], temperature=0, max_output_tokens=100) \
            as (conn, events):
        await conn.conversation.item.create(
            item=user_text(f"Do you have a table for 2 people on {day} at 19:00?"))
        await conn.response.create()
        first = await events.until("response.done", timeout=180)
        assert first["response"]["status"] == "completed"
        call = next(i for i in first["response"]["output"] if i["type"] == "function_call")
        assert call["name"] == "check_availability"
        arguments = json.loads(call["arguments"])
        # The tool descriptions were prefilled while the session was set up: the reply's
        # prompt (some 2,000 tokens) came mostly from the session's cache.
        details = first["response"]["usage"]["input_token_details"]
        assert details["cached_tokens"] >= first["response"]["usage"]["input_tokens"] // 2

        # The server runs the call and records its result in the conversation...
        output = await events.until(
            "conversation.item.added", lambda e: e["item"]["type"] == "function_call_output",
            timeout=60)
        assert output["item"]["call_id"] == call["call_id"]
        result = json.loads(output["item"]["output"])
        if "error" in result:  # the backend refused the model's arguments, and says why
            assert result["error"]
        else:  # the booking backend's own answer for those arguments
            assert result["date"] == arguments["date"]
            assert result["party_size"] == arguments["party_size"]
            assert "available" in result or "available_times" in result
        # ...and answers from it without being asked (after more calls, if it makes them).
        follow = await events.until(
            "response.done", lambda e: any(i["type"] == "message"
                                           for i in e["response"]["output"]), timeout=240)
    assert events.index(output) < events.index(follow)
    assert follow["response"]["status"] in ("completed", "incomplete"), follow["response"]
    assert said(message_of(follow)).strip()
    # Every call the server ran has its result in the conversation, before the answer.
    calls = {e["item"]["call_id"] for e in events.of("conversation.item.added")
             if e["item"]["type"] == "function_call"}
    outputs = {e["item"]["call_id"] for e in events.seen[: events.index(follow)]
               if e["type"] == "conversation.item.added"
               and e["item"]["type"] == "function_call_output"}
    assert calls == outputs


# -- protocol errors and beta names ----------------------------------------------------------

async def test_malformed_events_get_errors_and_the_session_goes_on(server):
    async with realtime(server) as (conn, events):
        await conn.send_raw("{this is not json")
        error = (await events.until("error"))["error"]
        assert error["code"] == "invalid_json"

        await conn.send_raw(json.dumps({"type": "session.dance", "event_id": "evt_dance"}))
        error = (await events.until("error"))["error"]
        assert (error["code"], error["param"], error["event_id"]) == \
            ("invalid_event_type", "type", "evt_dance")

        await conn.send_raw(json.dumps({
            "type": "session.update", "event_id": "evt_fast",
            "session": {"type": "realtime", "audio": {"output": {"speed": 9}}}}))
        error = (await events.until("error"))["error"]
        assert (error["code"], error["param"], error["event_id"]) == \
            ("invalid_value", "session.audio.output.speed", "evt_fast")

        await conn.send_raw(json.dumps({"type": "input_audio_buffer.append",
                                        "audio": "not base64!"}))
        error = (await events.until("error"))["error"]
        assert error["param"] == "audio"

        await conn.session.update(session={"type": "realtime",
                                           "audio": {"output": {"speed": 1.5}}})
        updated = await events.until("session.updated")
    assert updated["session"]["audio"]["output"]["speed"] == 1.5


async def test_beta_clients_get_beta_names(server):
    url = server.replace("http", "ws", 1) + f"/v1/realtime?model={MODEL}"
    headers = {"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "realtime=v1"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        events = Events(ws.recv, validate=False)
        created = (await events.until("session.created"))["session"]
        assert created["input_audio_format"] == "pcm16" and "audio" not in created
        await ws.send(json.dumps({"type": "session.update", "session": {
            "modalities": ["text"], "input_audio_format": "pcm16", "voice": "alloy",
            "temperature": 0, "max_response_output_tokens": 30}}))
        updated = (await events.until("session.updated"))["session"]
        assert (updated["modalities"], updated["input_audio_format"], updated["voice"]) == \
            (["text"], "pcm16", "alloy")

        await ws.send(json.dumps({"type": "conversation.item.create",
                                  "item": user_text("What is the capital of France?")}))
        item = (await events.until("conversation.item.created"))["item"]
        assert item["role"] == "user"
        await ws.send(json.dumps({"type": "response.create"}))
        done = await events.until("response.done", timeout=90)

    text = "".join(e["delta"] for e in events.of("response.text.delta"))
    assert "paris" in words(text)
    assert events.of("response.text.done")[0]["text"] == text
    assert done["response"]["status"] == "completed"
    assert done["response"]["modalities"] == ["text"]
    assert message_of(done)["content"][0] == {"type": "text", "text": text}
    ga_only = {"response.output_text.delta", "response.output_text.done",
               "conversation.item.added", "conversation.item.done"}
    assert not ga_only & set(events.kinds())


# -- telephony audio -------------------------------------------------------------------------

async def test_mulaw_input_is_heard(server):
    speech = decode_audio(QUESTION.read_bytes(), rate=8000)
    ulaw = encode_audio(np.concatenate([speech, np.zeros(12_000, np.float32)]), 8000,
                        "g711_ulaw")
    vad = {"type": "server_vad", "create_response": False}
    async with realtime(server, audio={"input": {"format": {"type": "audio/pcmu"},
                                                 "transcription": TRANSCRIBE,
                                                 "turn_detection": vad}}) as (conn, events):
        await stream(conn, ulaw, chunk=8 * CHUNK_MS)  # 8,000 bytes a second
        done = await events.until("conversation.item.input_audio_transcription.completed",
                                  timeout=60)
    assert events.of("input_audio_buffer.speech_started")
    assert "capital" in words(done["transcript"])


# -- reconnect -------------------------------------------------------------------------------

async def test_reconnect_with_the_conversation_id_resumes(server, question):
    options = {"output_modalities": ["text"], "temperature": 0, "max_output_tokens": 30}
    async with realtime(server, **options) as (conn, events):
        conversation_id = events.of("conversation.created")[0]["conversation"]["id"]
        await stream(conn, spoken(question))
        first = await events.until("response.done", timeout=90)
        user = next(e["item"] for e in events.of("conversation.item.done")
                    if e["item"]["role"] == "user")  # transcribed before the answer began
        turn = events.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"] - \
            events.of("input_audio_buffer.speech_started")[0]["audio_start_ms"]
        assistant = message_of(first)
        assert "paris" in words(said(assistant))
        # The link drops: no close handshake, as when a network goes away.
        conn._connection.transport.abort()
        with contextlib.suppress(Exception):
            await conn.close()

    async with realtime(server, query={"conversation_id": conversation_id}) as (conn, events):
        session = events.of("session.created")[0]["session"]
        assert session["output_modalities"] == ["text"] and session["max_output_tokens"] == 30
        assert events.of("conversation.created")[0]["conversation"]["id"] == conversation_id
        retrieved = []
        for earlier in (user, assistant):
            await conn.conversation.item.retrieve(item_id=earlier["id"])
            got = (await events.until("conversation.item.retrieved"))["item"]
            assert (got["id"], got["role"], said(got)) == \
                (earlier["id"], earlier["role"], said(earlier))
            retrieved.append(got)
        # The user's turn kept its audio, as long as the turn was.
        audio = base64.b64decode(retrieved[0]["content"][0]["audio"])
        assert abs(len(audio) // PCM_BYTES_PER_MS - turn) <= 100, (len(audio), turn)
        # The model reads the conversation so far: "that city" is the one it named.
        await conn.conversation.item.create(item=user_text("Tell me more about that city."))
        await conn.response.create()
        answer = await events.until("response.done", timeout=90)
    assert "paris" in words(said(message_of(answer)))


# -- several at once -------------------------------------------------------------------------

async def test_several_sessions_at_once(server, question):
    async def one_session() -> tuple[str, str]:
        async with realtime(server, **SHORT) as (conn, events):
            sender = asyncio.create_task(stream(conn, spoken(question)))
            done = await events.until("response.done", timeout=240)
            await sender
        return done["response"]["status"], said(message_of(done))

    results = await asyncio.gather(*(one_session() for _ in range(3)))
    for status, transcript in results:
        assert status == "completed"
        assert "paris" in words(transcript)
