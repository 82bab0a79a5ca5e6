"""Chat Completions with audio through the official `openai` SDK, against a real server."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import openai
import pytest

from agent.audio import decode_audio, encode_audio
from tests.e2e.conftest import API_KEY
from tests.speech_text import word_error_rate

QUESTION = "What is the capital of France?"
# One Piper rendition of QUESTION, kept as a file: Piper's prosody is random per call and
# Whisper base sometimes hears "friends" in a rendition, which would make every test that
# asks the question by voice depend on a dice roll.
QUESTION_WAV = (Path(__file__).parents[1] / "fixtures" / "question_capital_of_france.wav")
OUTPUT_FORMATS = ["wav", "mp3", "flac", "opus", "aac", "pcm16", "g711_ulaw", "g711_alaw"]


def _audio_reply(client, fmt: str, content, **extra):
    return client.chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"],
        audio={"voice": "alloy", "format": fmt}, temperature=0, max_completion_tokens=24,
        messages=[{"role": "user", "content": content}], **extra)


def _transcribe(asr, data: bytes, fmt: str) -> str:
    pcm = decode_audio(data, fmt if fmt in ("pcm16", "g711_ulaw", "g711_alaw") else None)
    return asr.transcribe(pcm, words=False).text


def test_text_in_text_out(client):
    reply = client.chat.completions.create(
        model="gpt-4o-audio-preview", temperature=0, max_completion_tokens=20,
        messages=[{"role": "user", "content": QUESTION}])
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.audio is None
    assert reply.usage.completion_tokens <= 20 and reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_audio_in_audio_out_every_format(client, asr, fmt):
    question = base64.b64encode(QUESTION_WAV.read_bytes()).decode()
    reply = _audio_reply(client, fmt, [{"type": "input_audio",
                                        "input_audio": {"data": question, "format": "wav"}}])
    message = reply.choices[0].message
    assert message.content is None
    assert message.audio.id.startswith("audio_")
    assert message.audio.expires_at > reply.created
    assert "Paris" in message.audio.transcript  # the spoken question was understood
    heard = _transcribe(asr, base64.b64decode(message.audio.data), fmt)
    # The reply is a short sentence and Whisper base slips on about one word in six of
    # Piper's speech ("France is" -> "Francis"): the check allows two slips in six words.
    assert "Paris" in heard, (fmt, heard)
    assert word_error_rate(message.audio.transcript, heard) <= 0.34, (fmt, heard)
    details = reply.usage.prompt_tokens_details
    assert details.audio_tokens >= 10  # ~2 s of question at 10 tokens per second
    assert reply.usage.completion_tokens_details.audio_tokens > 0


@pytest.mark.parametrize("fmt", ["mp3", "flac", "ogg", "webm", "aac", "m4a", "pcm16",
                                 "g711_ulaw", "g711_alaw"])
def test_every_input_format_is_understood(client, fmt):
    pcm = decode_audio(QUESTION_WAV.read_bytes(), rate=24000 if fmt == "pcm16" else 16000)
    out_fmt = {"ogg": "opus", "webm": "opus", "m4a": "aac"}.get(fmt, fmt)
    data = encode_audio(pcm, 24000 if fmt == "pcm16" else 16000, out_fmt)
    if fmt in ("webm", "m4a"):
        data = _remux(data, out_fmt, fmt)
    reply = client.chat.completions.create(
        model="gpt-audio", temperature=0, max_completion_tokens=24,
        messages=[{"role": "user", "content": [
            {"type": "input_audio",
             "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}]}])
    assert "Paris" in reply.choices[0].message.content, fmt


def _remux(data: bytes, codec_format: str, container: str) -> bytes:
    """The same encoded stream in another container (WebM for Opus, MP4 for AAC)."""
    import io

    import av

    source = av.open(io.BytesIO(data))
    out = io.BytesIO()
    target = av.open(out, "w", format={"webm": "webm", "m4a": "ipod"}[container])
    stream_in = source.streams.audio[0]
    stream_out = target.add_stream_from_template(stream_in)
    for packet in source.demux(stream_in):
        if packet.dts is None:
            continue
        packet.stream = stream_out
        target.mux(packet)
    target.close()
    return out.getvalue()


def test_streaming_audio_and_transcript(client, asr):
    stream = client.chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"],
        audio={"voice": "nova", "format": "pcm16"}, temperature=0, max_completion_tokens=160,
        stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me a long story about Paris."}])
    chunks = list(stream)
    transcript, data, order = "", "", []
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        audio = getattr(delta, "audio", None) or {}
        audio = audio if isinstance(audio, dict) else audio.model_dump(exclude_none=True)
        if audio.get("transcript"):
            transcript += audio["transcript"]
            order.append("t")
        if audio.get("data"):
            data += audio["data"]
            order.append("a")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    # audio started before the text was finished (the reply is long enough that writing
    # it takes longer than speaking its first clause)
    assert "a" in order and order.index("a") < len(order) - 1 - order[::-1].index("t")
    heard = asr.transcribe(decode_audio(base64.b64decode(data), "pcm16"), words=False).text
    assert word_error_rate(transcript, heard) <= 0.25, (transcript, heard)


def test_text_streaming_content_deltas(client):
    stream = client.chat.completions.create(
        model="smollm2", temperature=0, max_completion_tokens=16, stream=True,
        messages=[{"role": "user", "content": QUESTION}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_multi_turn_by_audio_id(client):
    first = _audio_reply(client, "mp3", QUESTION)
    audio_id = first.choices[0].message.audio.id
    follow = client.chat.completions.create(
        model="gpt-4o-audio-preview", temperature=0, max_completion_tokens=16,
        messages=[{"role": "user", "content": QUESTION},
                  {"role": "assistant", "audio": {"id": audio_id}},
                  {"role": "user", "content": "Repeat your answer."}])
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens_details.text_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-4o-audio-preview", max_completion_tokens=8,
            messages=[{"role": "user", "content": "hi"},
                      {"role": "assistant", "audio": {"id": "audio_does_not_exist"}},
                      {"role": "user", "content": "and?"}])
    assert info.value.param == "messages[1].audio.id"


def test_n_choices_and_seed(client):
    def ask(n: int):
        return client.chat.completions.create(
            model="gpt-4o-audio-preview", temperature=1.0, seed=7, n=n,
            max_completion_tokens=12, messages=[{"role": "user", "content": "Name a fruit."}])

    reply = ask(3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    # Seeded sampling repeats for the same request run alone; within one batch, rows may
    # differ in the last bits of their logits, so only single-choice runs are compared.
    assert ask(1).choices[0].message.content == ask(1).choices[0].message.content


def test_speed_extension_changes_audio_length(client):
    def seconds(speed: float) -> float:
        reply = client.chat.completions.create(
            model="gpt-4o-audio-preview", modalities=["text", "audio"], temperature=0,
            audio={"voice": "alloy", "format": "wav"}, max_completion_tokens=20,
            messages=[{"role": "user", "content": QUESTION}], extra_body={"speed": speed})
        pcm = decode_audio(base64.b64decode(reply.choices[0].message.audio.data))
        return len(pcm) / 16000

    assert seconds(0.5) > 1.5 * seconds(1.5)


def _error(server: str, body: dict, key: str | None = API_KEY, path="/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server + path, json=body, headers=headers, timeout=60)
    return r.status_code, r.json()["error"]


GOOD = {"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("patch", "status", "param", "code"), [
    ({"model": "gpt-9"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "%%%not-base64%%%", "format": "wav"}}]}]},
     400, "messages[0].content[0].input_audio.data", "invalid_base64"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"this is not audio at all" * 20).decode(),
        "format": "mp3"}}]}]}, 400, "messages[0].content[0].input_audio", "invalid_audio"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "darth", "format": "wav"}},
     400, "audio.voice", "invalid_voice"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
      "speed": 9}, 400, "speed", "invalid_value"),
    ({"modalities": ["text", "audio"]}, 400, "audio", "missing_required_parameter"),
    ({"logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
    ({"temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"max_completion_tokens": 10**6}, 400, "max_completion_tokens", "context_length_exceeded"),
])
def test_error_paths(server, patch, status, param, code):
    got_status, error = _error(server, {**GOOD, **patch})
    assert (got_status, error["param"], error["code"]) == (status, param, code), error
    assert error["message"]


def test_auth_errors(server):
    status, error = _error(server, GOOD, key=None)
    assert (status, error["code"]) == (401, "invalid_api_key")
    status, error = _error(server, GOOD, key="sk-wrong")
    assert (status, error["code"]) == (401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_oversize_body_and_bad_json(server):
    big = "A" * (8 * 1024 * 1024)  # over the 4 MiB audio limit, base64-inflated
    r = httpx.post(server + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {API_KEY}"}, json={**GOOD, "user": big}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_models_listing(client):
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-audio-preview", "gpt-audio-mini", "whisper-1", "smollm2"} <= ids
    assert client.chat.completions.create(
        model="gpt-4o-audio-preview-2025-06-03", max_completion_tokens=2,
        messages=[{"role": "user", "content": "hi"}]).choices


def test_healthz_says_the_default_model_runs_its_own_quantised_weights(server):
    stats = httpx.get(server + "/healthz").json()["decoder"]["smollm2"]
    assert stats["backend"] == "cpu"
    assert stats["weights"] == "native (Q4_1, Q8_0)"  # the GGUF's blocks, not re-quantised
    assert stats["activations"] == "int8x2"  # fp32's answers, "Paris" among them


def test_disconnect_cancels_generation(server):
    import time

    body = {**GOOD, "stream": True, "max_completion_tokens": 400, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # one token arrived: now hang up
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = httpx.get(server + "/healthz").json()["decoder"]
        if all(s["decoding"] == 0 and s["prefilling"] == 0 for s in stats.values()):
            return
        time.sleep(0.1)
    pytest.fail(f"generation still running after the client left: {stats}")
