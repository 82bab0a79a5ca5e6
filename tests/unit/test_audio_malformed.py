"""Bad audio fails with AudioError and a message; nothing else escapes, nothing hangs."""

from __future__ import annotations

import io
import struct
import time
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
from audio_signals import pyav_file, speech_like, tone, wav_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.audio import INPUT_FORMATS, StreamingEncoder, decode_audio, encode_audio
from agent.audio import decode as decode_module
from agent.errors import AudioError

SIGNAL = speech_like(16000, 2.0)
GOOD = {fmt: encode_audio(SIGNAL, 16000, fmt) for fmt in ("wav", "mp3", "flac", "opus", "aac")}
GOOD["webm"] = pyav_file(SIGNAL[None], 16000, "webm", "libopus")
GOOD["m4a"] = pyav_file(SIGNAL[None], 16000, "ipod", "aac")
LIVE_WEBM = pyav_file(SIGNAL[None], 16000, "webm", "libopus", seekable=False)


def streamed(fmt: str) -> bytes:
    encoder = StreamingEncoder(fmt, 16000)
    return encoder.feed(SIGNAL) + encoder.close()


def video_only_webm() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _wav_with(offset: int, fmt: str, value: int) -> bytes:
    wav = bytearray(GOOD["wav"])
    struct.pack_into(fmt, wav, offset, value)
    return bytes(wav)


RNG = np.random.default_rng(1234)
CORPUS = {
    "empty": b"",
    "one byte": b"\x00",
    "text": b"This is a transcript, not audio.\n" * 40,
    "json": b'{"audio": "not really"}',
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + RNG.bytes(300),
    "random bytes": RNG.bytes(5000),
    "zeros": bytes(5000),
    "random after an mp3 sync word": b"\xff\xfb\x90\x64" + RNG.bytes(5000),
    "wav cut in half": GOOD["wav"][: len(GOOD["wav"]) // 2],
    "wav header only": GOOD["wav"][:44],
    "wav claiming 1 GiB": _wav_with(40, "<I", 1 << 30),
    "wav with zero channels": _wav_with(22, "<H", 0),
    "wav with rate 0": _wav_with(24, "<I", 0),
    "riff but no chunks": b"RIFF\x04\x00\x00\x00WAVE",
    "mp3 cut in half": GOOD["mp3"][: len(GOOD["mp3"]) // 2],
    "streamed mp3 cut in half": streamed("mp3")[: len(streamed("mp3")) // 2 + 1],
    "ogg opus cut in half": GOOD["opus"][: len(GOOD["opus"]) // 2],
    "ogg cut at a page boundary": GOOD["opus"][: GOOD["opus"].rfind(b"OggS")],
    "flac cut in half": GOOD["flac"][: len(GOOD["flac"]) // 2],
    "streamed flac cut in half": streamed("flac")[: len(streamed("flac")) // 2],
    "aac cut in half": GOOD["aac"][: len(GOOD["aac"]) // 2],
    "m4a cut in half": GOOD["m4a"][: len(GOOD["m4a"]) // 2],
    "webm cut in half": GOOD["webm"][: len(GOOD["webm"]) // 2],
    "live webm (no duration) cut in half": LIVE_WEBM[: len(LIVE_WEBM) // 2],
    "webm without audio": video_only_webm(),
    "ogg header only": GOOD["opus"][:200],
    "m4a ftyp only": GOOD["m4a"][:32],
}


@pytest.mark.parametrize("name", CORPUS)
def test_malformed_audio_raises_audio_error(name):
    with pytest.raises(AudioError) as caught:
        decode_audio(CORPUS[name])
    assert caught.value.message.endswith(".") and caught.value.status == 400


@pytest.mark.parametrize("name", ["text", "png", "random bytes", "zeros"])
@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "webm", "m4a", "flac", "aac"])
def test_declared_containers_do_not_rescue_non_audio(name, fmt):
    with pytest.raises(AudioError):
        decode_audio(CORPUS[name], fmt)


def test_good_files_in_the_corpus_really_are_good():
    for fmt, data in [*GOOD.items(), ("live webm", LIVE_WEBM)]:
        assert len(decode_audio(data)) > 30000, fmt


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_too_long(fmt):
    with pytest.raises(AudioError, match="longer than the limit of 1 s"):
        decode_audio(GOOD[fmt], max_seconds=1.0)


def test_too_long_raw():
    with pytest.raises(AudioError, match="longer than"):
        decode_audio(bytes(48000 * 2 * 2), "pcm16", max_seconds=1.0)


def test_the_length_limit_stops_decoding_early():
    """An ADTS stream states no duration, so the limit is enforced while decoding: 2 s of
    good audio then garbage fails on length, proving the garbage was never reached."""
    damaged = GOOD["aac"] + RNG.bytes(20000)
    with pytest.raises(AudioError, match=r"corrupt|truncated"):
        decode_audio(damaged)
    with pytest.raises(AudioError, match="longer than"):
        decode_audio(damaged, max_seconds=1.0)


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_too_large(fmt):
    with pytest.raises(AudioError, match="limit is 1000 bytes"):
        decode_audio(GOOD[fmt], max_bytes=1000)


def test_the_time_guard_stops_a_decode():
    expired = time.monotonic() - 1.0
    with pytest.raises(AudioError, match="took too long"):
        decode_module._demux(GOOD["flac"], "flac", 16000, 600.0, expired)


def test_a_few_corrupt_packets_mid_file_are_skipped_as_players_do():
    mp3 = bytearray(GOOD["mp3"])
    middle = len(mp3) // 2
    mp3[middle:middle + 4] = b"\xff\xff\xff\xff"        # wreck one frame header
    out = decode_audio(bytes(mp3))
    assert abs(len(out) - len(SIGNAL)) < 0.05 * len(SIGNAL)


def test_crafted_many_channel_aac_does_not_crash_the_process():
    """A fuzzed ADTS file whose 20-channel frames once segfaulted PyAV's plane reader."""
    data = (Path(__file__).parent / "data" / "adts_20_channel_crash.aac").read_bytes()
    for fmt in (None, "aac"):
        with pytest.raises(AudioError, match="corrupt"):
            decode_audio(data, fmt, rate=44100)


def test_unknown_format_names_are_audio_errors():
    with pytest.raises(AudioError) as caught:
        decode_audio(GOOD["wav"], "ogg_vorbis")
    assert caught.value.code == "unsupported_format"


def _mutations(data: bytes, draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if action == "flip":
            out[at] = draw(st.integers(0, 255))
        elif action == "cut":
            out = out[:at] + out[at + draw(st.integers(1, 400)):]
        elif action == "insert":
            out[at:at] = draw(st.binary(max_size=48))
        else:
            out += out[at:]
    return bytes(out)


SEEDS = [wav_file(tone(8000, 0.2)[None], 8000, bits=16)] + [
    encode_audio(tone(16000, 0.2), 16000, fmt) for fmt in ("mp3", "flac", "opus", "aac")
] + [pyav_file(tone(16000, 0.2)[None], 16000, "webm", "libopus"),
     pyav_file(tone(16000, 0.2)[None], 16000, "ipod", "aac")]


@st.composite
def audio_like_bytes(draw) -> bytes:
    """Arbitrary bytes, or a real file of each container damaged in a few places."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2000))
    return _mutations(draw(st.sampled_from(SEEDS)), draw)


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=timedelta(seconds=5), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=audio_like_bytes(),
       fmt=st.sampled_from([None, *INPUT_FORMATS, "opus", "pcmu", "bogus"]),
       rate=st.sampled_from([8000, 16000, 44100]))
def test_fuzz_decode_returns_clean_audio_or_audio_error(data, fmt, rate):
    try:
        out = decode_audio(data, fmt, rate=rate)
    except AudioError as error:
        assert error.message
        return
    assert out.dtype == np.float32 and out.ndim == 1
    assert np.isfinite(out).all()
    assert out.size == 0 or np.abs(out).max() <= 1.0
