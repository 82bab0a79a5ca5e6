"""Every output format round-trips through a real codec; streaming matches whole-buffer.

Bounds (measured on this machine with these signals, 24 kHz input, in brackets):
- wav, flac, pcm16: bit-exact against the input quantised to int16.
- G.711: SNR >= 33 dB against the input band-limited to 8 kHz [37.7-38.4 dB].
- mp3 (64 kbit/s): SNR >= 20 dB [23.3-26.0]; aac (96 kbit/s): >= 22 dB [28.3-33.7];
  opus (48 kbit/s): >= 17 dB [20.0-37.3]. For the lossy codecs, every third-octave band
  from 100 Hz to 4 kHz within 30 dB of the loudest keeps its level within 1.5 dB
  [max 0.45 dB].
SNRs are taken after aligning for the codec's start delay.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from audio_signals import align, band_levels_db, chirp_mix, snr_db, speech_like

from agent.audio import (
    OUTPUT_FORMATS,
    StreamingEncoder,
    decode_audio,
    encode_audio,
    output_rate,
    resample,
)
from agent.audio.pcm import to_int16
from agent.errors import AudioError

RATE = 24000
SIGNALS = {"chirp": chirp_mix(RATE, 1.0), "speech": speech_like(RATE, 1.5)}
RAW = {"pcm16", "g711_ulaw", "g711_alaw"}
LOSSY_SNR_DB = {"mp3": 20.0, "aac": 22.0, "opus": 17.0}
MUXERS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "ogg", "aac": "aac"}
CHUNK = RATE // 10      # 100 ms feeds, as a TTS stream delivers them


def decode(data: bytes, fmt: str, rate: int = RATE) -> np.ndarray:
    return decode_audio(data, fmt if fmt in RAW else None, rate=rate)


def stream_encode(signal: np.ndarray, fmt: str, rate: int = RATE) -> list[bytes]:
    """The bytes from each feed, then those from close()."""
    encoder = StreamingEncoder(fmt, rate)
    parts = [encoder.feed(signal[i:i + CHUNK]) for i in range(0, len(signal), CHUNK)]
    return [*parts, encoder.close()]


def reference(signal: np.ndarray, fmt: str, rate: int = RATE) -> np.ndarray:
    """What survives the format's rate conversion: the most any codec could return."""
    out_rate = output_rate(fmt, rate)
    return resample(resample(signal, rate, out_rate), out_rate, rate)


@pytest.mark.parametrize("fmt", ["wav", "flac", "pcm16"])
@pytest.mark.parametrize("name", SIGNALS)
def test_lossless_formats_are_bit_exact(fmt, name):
    signal = SIGNALS[name]
    expected = to_int16(signal).astype(np.float32) / 32768.0
    for data in (encode_audio(signal, RATE, fmt), b"".join(stream_encode(signal, fmt))):
        np.testing.assert_array_equal(decode(data, fmt), expected)


def test_pcm16_from_another_rate_is_resampled_to_24k():
    signal = speech_like(22050, 1.0)
    data = encode_audio(signal, 22050, "pcm16")
    assert len(data) == 2 * 24000
    back = decode_audio(data, "pcm16", rate=22050)
    assert snr_db(reference(signal, "pcm16", 22050), back) > 75.0


@pytest.mark.parametrize("fmt", ["g711_ulaw", "g711_alaw"])
@pytest.mark.parametrize("name", SIGNALS)
def test_g711_round_trip(fmt, name):
    signal = SIGNALS[name]
    data = encode_audio(signal, RATE, fmt)
    assert len(data) == len(signal) // 3                       # 8 kHz, one byte a sample
    assert snr_db(reference(signal, fmt), decode(data, fmt)) > 33.0


@pytest.mark.parametrize("fmt", sorted(LOSSY_SNR_DB))
@pytest.mark.parametrize("name", SIGNALS)
def test_lossy_round_trip(fmt, name):
    signal = SIGNALS[name]
    decoded = decode(encode_audio(signal, RATE, fmt), fmt)
    # Codec priming and padding may add at most two frames (aac: 1024 samples each).
    assert 0 <= len(decoded) - len(signal) <= 2 * 1024 * RATE // output_rate(fmt, RATE) + 100
    ref, test = align(reference(signal, fmt), decoded, max_lag=4096)
    assert snr_db(ref, test) > LOSSY_SNR_DB[fmt]
    levels = band_levels_db(ref, RATE, 4000.0)
    loud = levels > levels.max() - 30.0
    assert np.max(np.abs(levels - band_levels_db(test, RATE, 4000.0))[loud]) < 1.5


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_streaming_decodes_like_whole_buffer(fmt):
    signal = SIGNALS["speech"]
    whole = decode(encode_audio(signal, RATE, fmt), fmt)
    streamed = decode(b"".join(stream_encode(signal, fmt)), fmt)
    # Streamed MP3 has no Xing/LAME header, so decoders keep LAME's start delay.
    extra = len(streamed) - len(whole)
    assert 0 <= extra <= (1600 if fmt == "mp3" else 0)
    a, b = align(whole, streamed, max_lag=2048)
    assert len(a) >= len(whole) - 1
    assert snr_db(a, b) > 60.0


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_streaming_yields_bytes_before_close(fmt):
    parts = stream_encode(SIGNALS["speech"], fmt)
    before_close = sum(len(p) for p in parts[:-1])
    assert before_close >= 0.5 * sum(len(p) for p in parts)
    # The first bytes leave within 300 ms of audio fed.
    assert any(parts[:3])


@pytest.mark.parametrize("fmt", sorted(MUXERS))
def test_a_stream_cut_before_close_is_already_playable(fmt):
    """A client playing the response as it arrives can decode what it has so far."""
    signal = SIGNALS["speech"]
    parts = stream_encode(signal, fmt)
    so_far = b"".join(parts[:10])                               # 1.0 s fed, no close()
    with av.open(io.BytesIO(so_far), format=MUXERS[fmt]) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        rate = stream.rate
    assert samples / rate > 0.7


def test_streamed_wav_header_announces_unknown_length():
    first = stream_encode(SIGNALS["chirp"], "wav")[0]
    assert first[:4] == b"RIFF" and first[8:16] == b"WAVEfmt "
    assert first[4:8] == b"\xff\xff\xff\xff" and first[40:44] == b"\xff\xff\xff\xff"
    whole = encode_audio(SIGNALS["chirp"], RATE, "wav")
    assert int.from_bytes(whole[40:44], "little") == 2 * len(SIGNALS["chirp"])


@pytest.mark.parametrize(("fmt", "rate_in", "rate_out"), [
    ("mp3", 22050, 22050), ("aac", 22050, 22050), ("flac", 22050, 22050),
    ("opus", 22050, 48000), ("wav", 16000, 16000),
])
def test_containers_carry_the_format_rate(fmt, rate_in, rate_out):
    data = encode_audio(speech_like(rate_in, 0.3), rate_in, fmt)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.audio[0].rate == rate_out
        assert container.streams.audio[0].channels == 1


def test_sample_types_and_bad_shapes():
    signal = SIGNALS["chirp"]
    as_int16 = to_int16(signal)
    assert encode_audio(as_int16, RATE, "pcm16") == encode_audio(signal, RATE, "pcm16")
    assert encode_audio(signal.astype(np.float64), RATE, "pcm16") == encode_audio(
        signal, RATE, "pcm16")
    noisy = signal.copy()
    noisy[::100] = np.nan
    assert np.isfinite(decode(encode_audio(noisy, RATE, "flac"), "flac")).all()
    with pytest.raises(ValueError):
        encode_audio(np.zeros((2, 100), np.float32), RATE, "wav")
    with pytest.raises(AudioError):
        encode_audio(signal, RATE, "ogg_vorbis")


def test_empty_audio_encodes_to_an_empty_stream():
    empty = np.zeros(0, dtype=np.float32)
    assert encode_audio(empty, RATE, "pcm16") == b""
    assert len(encode_audio(empty, RATE, "wav")) == 44
    for fmt in MUXERS:
        assert isinstance(encode_audio(empty, RATE, fmt), bytes)


def test_encoder_lifecycle():
    encoder = StreamingEncoder("opus", RATE)
    assert encoder.mime == "audio/ogg" and encoder.rate == 48000
    body = encoder.feed(SIGNALS["chirp"]) + encoder.close()
    assert encoder.close() == b""
    with pytest.raises(RuntimeError):
        encoder.feed(SIGNALS["chirp"])
    assert len(decode(body, "opus")) == len(SIGNALS["chirp"])
