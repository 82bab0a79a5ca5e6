"""Format names, aliases, MIME types and rates that the HTTP and WebSocket fronts rely on."""

from __future__ import annotations

import pytest

from agent.audio import formats
from agent.errors import AudioError


def test_openai_output_formats_are_all_supported_and_stream():
    for name in ("wav", "mp3", "flac", "opus", "aac", "pcm16", "g711_ulaw", "g711_alaw"):
        assert name in formats.OUTPUT_FORMATS
        assert name in formats.STREAMING_OUTPUT_FORMATS


@pytest.mark.parametrize(("name", "mime"), [
    ("wav", "audio/wav"), ("mp3", "audio/mpeg"), ("flac", "audio/flac"),
    ("opus", "audio/ogg"), ("aac", "audio/aac"), ("pcm16", "audio/pcm"), ("pcm", "audio/pcm"),
    ("g711_ulaw", "audio/basic"), ("g711_alaw", "audio/x-alaw-basic"), ("webm", "audio/webm"),
])
def test_mime_types(name, mime):
    assert formats.mime_type(name) == mime


@pytest.mark.parametrize(("name", "rate_in", "rate_out"), [
    ("pcm16", 22050, 24000), ("g711_ulaw", 22050, 8000), ("g711_alaw", 16000, 8000),
    ("opus", 22050, 48000), ("wav", 22050, 22050), ("flac", 44100, 44100),
    ("mp3", 22050, 22050), ("mp3", 20000, 22050), ("aac", 24000, 24000), ("aac", 7000, 8000),
])
def test_output_rates(name, rate_in, rate_out):
    assert formats.output_rate(name, rate_in) == rate_out


@pytest.mark.parametrize(("alias", "canonical"), [
    ("pcm", "pcm16"), ("audio/pcm", "pcm16"), ("pcmu", "g711_ulaw"), ("audio/pcmu", "g711_ulaw"),
    ("pcma", "g711_alaw"), ("audio/basic", "g711_ulaw"), ("opus", "ogg"), ("mpga", "mp3"),
    ("audio/mpeg", "mp3"), (".M4A", "m4a"), ("mp4", "m4a"), ("audio/webm;codecs=opus", "webm"),
    ("WAV", "wav"), ("audio/x-wav", "wav"),
])
def test_input_aliases(alias, canonical):
    assert formats.input_format(alias) == canonical


def test_raw_rates_follow_openai():
    assert formats.DEFAULT_RAW_RATES == {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}
    assert formats.is_raw("pcm") and not formats.is_raw("wav")


@pytest.mark.parametrize("bad", ["", "midi", "audio/x-nope", "opus2"])
def test_unknown_names_raise_audio_error(bad):
    with pytest.raises(AudioError) as caught:
        formats.input_format(bad)
    assert caught.value.code == "unsupported_format"
    with pytest.raises(AudioError):
        formats.output_format(bad)
