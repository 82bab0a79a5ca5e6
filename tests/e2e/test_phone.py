"""Phone calls end to end: this test plays Twilio against a real `parley serve`.

Twilio's side as its documentation has it: the voice webhook is form-encoded and signed
with the account's auth token (the `twilio` package computes the signature, as Twilio
does); the TwiML answer is parsed and its <Stream> opened with its <Parameter>s; the
stream sends `connected`, `start`, then the caller's real recorded speech as 8 kHz µ-law
in 20 ms `media` messages at real-time pace. The phone plays the server's audio at
real-time pace, echoes each `mark` when the audio before it has played, and on `clear`
drops what it holds and echoes the pending marks, as Twilio does. Every message the
server sends is checked against schemas/twilio/media_stream.json.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.audio import decode_audio, encode_audio
from agent.bench import twilio_phone
from tests.e2e.conftest import GREETING, TWILIO_TOKEN

pytestmark = pytest.mark.slow

QUESTION = Path(__file__).parents[1] / "fixtures" / "question_capital_of_france.wav"
RATE = twilio_phone.RATE


def caller(base: str, *, sign_with: str | None = TWILIO_TOKEN) -> twilio_phone.Phone:
    return twilio_phone.Phone(base, sign_with=sign_with)


def mulaw(samples: np.ndarray) -> bytes:
    return encode_audio(samples, RATE, "g711_ulaw")


@pytest.fixture(scope="module")
def question() -> bytes:
    """The recorded question as µ-law 8 kHz, with the quiet a caller leaves after it."""
    return mulaw(decode_audio(QUESTION.read_bytes(), rate=RATE)) + mulaw(
        np.zeros(RATE * 3 // 2, np.float32))


def speech_onset_s(audio: bytes) -> float:
    samples = decode_audio(audio, "g711_ulaw", rate=RATE, input_rate=RATE)
    frames = samples[: len(samples) // 80 * 80].reshape(-1, 80)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.02)
    return float(loud[0]) * 80 / RATE


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def transcribe(asr: Any, audio: bytes) -> str:
    samples = decode_audio(audio, "g711_ulaw", rate=16000, input_rate=RATE)
    return asr.transcribe(samples, language="en").text


# -- the call ---------------------------------------------------------------------------------

async def test_the_greeting_plays_talking_over_it_clears_it_and_the_question_is_answered(
        server, question, asr):
    phone = caller(server)
    try:
        await phone.call_in()
        greeting_at = await phone.wait_for_audio(0, timeout=90)
        await asyncio.sleep(1.5)  # the caller hears the greeting begin
        assert phone.played_since(greeting_at), "the greeting did not play"
        onset = speech_onset_s(question)
        talking = asyncio.create_task(phone.say(question))
        # `say` starts at once; the caller's voice begins `onset` seconds into the audio.
        voice_at = time.monotonic() + onset
        deadline = time.monotonic() + 10
        while not phone.clears and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert phone.clears, "talking over the greeting sent no clear"
        clear_after = phone.clears[0] - voice_at
        assert clear_after <= 1.5, f"clear {clear_after:.2f} s after the caller's voice"
        await talking
        await phone.wait_quiet(phone.clears[0])
        answer = phone.played_since(phone.clears[0])  # the greeting stopped at the clear
    finally:
        await phone.close()
    heard = words(transcribe(asr, answer))
    # Spoken, and about the question. Whisper hears the 8 kHz question's "France" as
    # "friends" now and then, so the answer is not held to naming Paris.
    assert len(heard) >= 3 and {"paris", "capital"} & set(heard), heard
    greeting = transcribe(asr, phone.played_since(greeting_at)[: int(RATE * 1.5)])
    assert set(words(greeting)) & set(words(GREETING)), greeting


async def test_keypad_digits_reach_the_model_as_a_turn(server):
    phone = caller(server)
    try:
        await phone.call_in()
        greeting_at = await phone.wait_for_audio(0, timeout=90)
        await phone.wait_quiet(greeting_at - 1, quiet_s=1.0)
        pressed = time.monotonic()
        for digit in "42#":
            await phone.press(digit)
        # No speech: an answer to the digits alone.
        answered = await phone.wait_for_audio(pressed, timeout=60)
    finally:
        await phone.close()
    assert answered > pressed


async def test_stop_ends_the_call_and_the_server_closes_the_stream(server):
    phone = caller(server)
    try:
        await phone.call_in()
        await phone.wait_for_audio(0, timeout=90)
        await phone.hang_up()
        closed = time.monotonic()
        await asyncio.wait_for(phone.ws.wait_closed(), 5)
        assert time.monotonic() - closed < 5
    finally:
        await phone.close()


async def test_malformed_messages_are_dropped_and_the_call_goes_on(server, question):
    phone = caller(server)
    try:
        await phone.call_in()
        await phone.wait_for_audio(0, timeout=90)
        await phone.ws.send("not json")
        await phone.ws.send(json.dumps({"event": "media", "streamSid": phone.stream,
                                        "media": {"payload": "%%%"}}))
        await phone.ws.send(json.dumps({"event": "teleport"}))
        began = await phone.say(question)
        await phone.wait_for_audio(began + len(question) / RATE - 1.5, timeout=60)
    finally:
        await phone.close()


# -- refusals ---------------------------------------------------------------------------------

async def test_an_unsigned_or_wrongly_signed_webhook_is_refused(server):
    assert (await caller(server, sign_with=None).dial()).status_code == 403
    wrong = await caller(server, sign_with="not-the-token").dial()
    assert wrong.status_code == 403
    assert wrong.json()["error"]["code"] == "invalid_signature"


async def test_a_stream_without_its_token_or_with_a_used_one_is_closed(server):
    phone = caller(server)
    url, parameters = twilio_phone.Phone.stream_of((await phone.dial()).text)
    for tampered in ({**parameters, "token": "forged.token"}, {
            k: v for k, v in parameters.items() if k != "token"}):
        stranger = caller(server)
        stranger.call = phone.call
        await stranger.answer(url, tampered)
        await asyncio.wait_for(stranger.ws.wait_closed(), 10)
        assert stranger.ws.close_code == 1008
        await stranger.close()
    first = caller(server)
    first.call = phone.call
    await first.answer(url, parameters)  # the genuine stream is let in
    await first.wait_for_audio(0, timeout=90)
    await first.close()
    replay = caller(server)
    replay.call = phone.call
    await replay.answer(url, parameters)  # the same token again
    await asyncio.wait_for(replay.ws.wait_closed(), 10)
    assert replay.ws.close_code == 1008
    await replay.close()
