"""/v1/audio/speech and /v1/audio/transcriptions through the official SDK."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from agent.audio import decode_audio
from tests.e2e.conftest import API_KEY
from tests.speech_text import word_error_rate

SENTENCE = "My flight to Boston leaves on Monday morning."


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_every_format_says_the_words(client, asr, fmt):
    audio = client.audio.speech.create(model="gpt-4o-mini-tts", voice="coral", input=SENTENCE,
                                       response_format=fmt).content
    pcm = decode_audio(audio, "pcm16" if fmt == "pcm" else None)
    assert word_error_rate(SENTENCE, asr.transcribe(pcm, words=False).text) <= 0.15


def test_speech_streams_to_file_and_speed(client, tmp_path):
    target = tmp_path / "out.wav"
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCE, response_format="wav") as response:
        response.stream_to_file(target)
    normal = len(decode_audio(target.read_bytes()))
    fast = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE,
                                      response_format="wav", speed=2.0).content
    assert len(decode_audio(fast)) < 0.75 * normal


def test_speech_sse(server):
    body = {"model": "gpt-4o-mini-tts", "voice": "echo", "input": SENTENCE,
            "response_format": "pcm", "stream_format": "sse"}
    r = httpx.post(server + "/v1/audio/speech", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2  # one per clause at least
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) > 24000 * 2  # over a second of 24 kHz pcm16


@pytest.mark.parametrize(("status", "body", "param"), [
    (400, {"voice": "nobody"}, "voice"),
    (400, {"speed": 0.1}, "speed"),
    (400, {"speed": 5}, "speed"),
    (400, {"response_format": "wma"}, "response_format"),
    (400, {"instructions": "whisper"}, "instructions"),
    (400, {"input": ""}, "input"),
    (404, {"model": "tts-9"}, "model"),
])
def test_speech_errors(server, status, body, param):
    request = {"model": "tts-1", "voice": "alloy", "input": "hello", **body}
    r = httpx.post(server + "/v1/audio/speech", json=request,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status
    assert r.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def spoken(speak) -> bytes:
    return speak(SENTENCE)


def test_transcription_json_and_text(client, spoken):
    result = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", spoken))
    assert word_error_rate(SENTENCE, result.text) <= 0.15
    text = client.audio.transcriptions.create(model="gpt-4o-transcribe",
                                              file=("q.wav", spoken), response_format="text")
    assert word_error_rate(SENTENCE, text) <= 0.15


def test_transcription_verbose_json_with_words(client, spoken):
    result = client.audio.transcriptions.create(
        model="whisper-1", file=("q.wav", spoken), response_format="verbose_json",
        timestamp_granularities=["word", "segment"], language="en")
    assert result.language == "en" and result.duration > 1
    assert len(result.words) >= 8
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= result.duration + 0.1
    assert result.segments and result.segments[0].text.strip()


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_transcription_subtitles(client, spoken, fmt):
    text = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", spoken),
                                              response_format=fmt)
    assert "-->" in text
    assert text.startswith("WEBVTT") if fmt == "vtt" else text.startswith("1\n")


def test_transcription_errors(server, spoken):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server + "/v1/audio/transcriptions"
    r = httpx.post(url, headers=headers, files={"file": ("x.wav", b"RIFF....garbage")},
                   data={"model": "whisper-1"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "file")
    r = httpx.post(url, headers=headers, data={"model": "whisper-1"},
                   files={"other": ("x.wav", spoken)})
    assert r.status_code == 400
    r = httpx.post(url, headers=headers, files={"file": ("x.wav", spoken)},
                   data={"model": "whisper-1", "response_format": "docx"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "response_format")
    r = httpx.post(url, headers=headers, files={"file": ("x.wav", spoken)},
                   data={"model": "whisper-9"})
    assert r.status_code == 404
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0) \
            .audio.transcriptions.create(model="whisper-1", file=("q.wav", spoken),
                                         timestamp_granularities=["word"])


def test_transcription_prompt_teaches_spellings(client, speak):
    audio = speak("Please call Siobhan Ngata about the Kealoha account.")
    plain = client.audio.transcriptions.create(model="whisper-1", file=("n.wav", audio))
    hinted = client.audio.transcriptions.create(model="whisper-1", file=("n.wav", audio),
                                                prompt="Siobhan Ngata, Kealoha")
    assert "Kealoha" in hinted.text and "Siobhan" in hinted.text
    assert hinted.text != plain.text
