"""Every input format decodes to mono float32 at the requested rate, at the right length.

Files are made independently of agent.audio.encode: WAVs by hand, the rest by muxing
with PyAV directly. Sources are 1 s, stereo where the format allows (left 440 Hz, right
1000 Hz), so the output also proves the downmix (the mean of the channels) and the rate.
Lossless sources must match the expected downmix at >= 60 dB SNR, lossy ones at >= 12 dB
(after aligning for codec delay; measured >= 17 dB).
"""

from __future__ import annotations

import numpy as np
import pytest
from audio_signals import (
    align,
    multichannel_file,
    peak_frequency,
    pyav_file,
    snr_db,
    tone,
    wav_file,
)

from agent.audio import RawStreamDecoder, StreamingEncoder, decode_audio, g711, resample
from agent.audio.pcm import to_int16
from agent.errors import AudioError

OUT = 16000


def stereo(rate: int) -> np.ndarray:
    return np.stack([tone(rate, 1.0, 440.0, 0.5), tone(rate, 1.0, 1000.0, 0.3)])


def expected_mono(rate: int) -> np.ndarray:
    return resample(stereo(rate).mean(axis=0), rate, OUT)


WAVS = {
    "u8": dict(bits=8), "s16": dict(bits=16), "s24": dict(bits=24), "s32": dict(bits=32),
    "f32": dict(bits=32, floating=True), "f64": dict(bits=64, floating=True),
    "s24-extensible": dict(bits=24, extensible=True),
}


@pytest.mark.parametrize("kind", WAVS)
@pytest.mark.parametrize("rate", [8000, 44100])
def test_wav_sample_formats(kind, rate):
    data = wav_file(stereo(rate), rate, **WAVS[kind])
    out = decode_audio(data, "wav", rate=OUT)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == OUT
    bound = 40.0 if kind == "u8" else 60.0          # 8-bit audio holds ~48 dB
    assert snr_db(expected_mono(rate), out) > bound


@pytest.mark.parametrize("kind", WAVS)
def test_wav_mono_at_native_rate_is_exact(kind):
    signal = tone(16000, 0.5, 440.0, 0.5)
    out = decode_audio(wav_file(signal[None], 16000, **WAVS[kind]), rate=16000)
    bits = WAVS[kind]["bits"]
    step = 0.0 if WAVS[kind].get("floating") else 2.0 ** (1 - bits)
    np.testing.assert_allclose(out, signal, atol=step / 2 + 1e-7)


LOSSY = {
    "mp3": ("mp3", "libmp3lame", 44100), "aac-adts": ("adts", "aac", 44100),
    "m4a": ("ipod", "aac", 44100), "mp4": ("mp4", "aac", 48000),
    "ogg-opus": ("ogg", "libopus", 48000), "webm-opus": ("webm", "libopus", 48000),
}
LOSSLESS = {"flac": ("flac", "flac", 48000), "ogg-flac": ("ogg", "flac", 44100)}


@pytest.mark.parametrize("name", [*LOSSY, *LOSSLESS])
def test_compressed_containers(name):
    muxer, codec, rate = {**LOSSY, **LOSSLESS}[name]
    data = pyav_file(stereo(rate), rate, muxer, codec, bit_rate=128000)
    out = decode_audio(data, rate=OUT)            # recognised from the bytes
    assert out.dtype == np.float32 and out.ndim == 1
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    if name in LOSSLESS:
        assert len(out) == OUT
        assert snr_db(expected_mono(rate), out) > 60.0
        return
    # Codec priming/padding: ADTS keeps AAC's 1024-sample priming, others trim it.
    assert OUT <= len(out) <= OUT + 2 * 1024 * OUT // rate + 50
    ref, test = align(expected_mono(rate), out, max_lag=2048)
    assert snr_db(ref, test) > 12.0


@pytest.mark.parametrize(("muxer", "codec", "layout", "lossless"), [
    ("ipod", "aac", "7.1", False), ("ogg", "libopus", "7.1", False),
    ("flac", "flac", "7.1", True), ("wav", "pcm_s16le", "hexadecagonal", True),
])
def test_many_channels_are_averaged(muxer, codec, layout, lossless):
    """7.1 AAC and Opus decode to planar frames of 8 channels, the case PyAV's plane
    walk gets wrong (see agent.audio.pcm); they must still average correctly.
    Measured SNR: aac 19.1 dB, opus 34.5 dB, flac/wav > 90 dB."""
    data, mean = multichannel_file(muxer, codec, layout, 48000, 0.5)
    out = decode_audio(data, rate=OUT)
    ref, test = align(resample(mean, 48000, OUT), out, max_lag=2048)
    assert len(ref) >= OUT // 2 - 10
    assert snr_db(ref, test) > (60.0 if lossless else 12.0)


@pytest.mark.parametrize(("fmt", "input_rate", "rate"), [
    ("pcm16", None, 24000), ("pcm16", 16000, 16000), ("pcm16", 48000, 48000),
    ("pcm", None, 24000), ("g711_ulaw", None, 8000), ("g711_alaw", None, 8000),
    ("pcmu", 16000, 16000),
])
def test_raw_formats(fmt, input_rate, rate):
    signal = tone(rate, 1.0, 440.0, 0.5)
    if fmt in ("pcm16", "pcm"):
        data = to_int16(signal).astype("<i2").tobytes()
    elif fmt in ("g711_ulaw", "pcmu"):
        data = g711.ulaw_encode(signal)
    else:
        data = g711.alaw_encode(signal)
    out = decode_audio(data, fmt, rate=OUT, input_rate=input_rate)
    assert len(out) == OUT
    assert abs(peak_frequency(out, OUT) - 440.0) < 2.0
    assert snr_db(resample(signal, rate, OUT), out) > (60.0 if fmt in ("pcm16", "pcm") else 33.0)


def test_the_bytes_decide_the_container_not_the_label():
    """A client labelling an MP3 "wav" (or an M4A "aac") still gets it decoded."""
    mp3 = pyav_file(stereo(44100), 44100, "mp3", "libmp3lame")
    m4a = pyav_file(stereo(44100), 44100, "ipod", "aac")
    assert len(decode_audio(mp3, "wav")) == len(decode_audio(mp3))
    assert len(decode_audio(m4a, "aac")) == len(decode_audio(m4a))


def test_raw_labels_are_taken_literally():
    wav = wav_file(tone(24000, 0.1)[None], 24000, bits=16)
    out = decode_audio(wav, "pcm16", rate=24000)
    assert len(out) == len(wav) // 2                # the header became two dozen samples


def test_streamed_wav_of_unknown_length_decodes():
    encoder = StreamingEncoder("wav", 22050)
    data = encoder.feed(tone(22050, 1.0)) + encoder.close()
    assert len(decode_audio(data, rate=OUT)) == OUT


def test_rate_changes_mid_stream_are_followed():
    """Two MP3 streams at different rates back to back (an appended recording)."""
    parts = []
    for rate, freq in ((44100, 440.0), (22050, 1000.0)):
        encoder = StreamingEncoder("mp3", rate)
        parts.append(encoder.feed(tone(rate, 1.0, freq)) + encoder.close())
    out = decode_audio(b"".join(parts), rate=OUT)
    # Streamed MP3s keep LAME's start delay and end padding: about two frames each.
    assert 2 * OUT <= len(out) <= 2 * OUT + 2 * 2 * 1152 * OUT // 22050
    assert abs(peak_frequency(out[:14000], OUT) - 440.0) < 3.0
    assert abs(peak_frequency(out[-14000:], OUT) - 1000.0) < 3.0


def test_non_finite_float_samples_become_silence():
    signal = tone(16000, 0.2)
    signal[::10] = np.nan
    signal[5::10] = np.inf
    out = decode_audio(wav_file(signal[None], 16000, bits=32, floating=True), rate=16000)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0


@pytest.mark.parametrize("fmt", ["pcm16", "g711_ulaw", "g711_alaw"])
def test_raw_stream_decoder_matches_whole_decode(fmt):
    signal = tone(8000, 1.0, 440.0, 0.5)
    data = (to_int16(signal).astype("<i2").tobytes() if fmt == "pcm16"
            else g711.ulaw_encode(signal) if fmt == "g711_ulaw" else g711.alaw_encode(signal))
    stream = RawStreamDecoder(fmt, input_rate=8000, rate=OUT)
    pieces = [stream.decode(data[i:i + 333]) for i in range(0, len(data), 333)]  # odd splits
    pieces.append(stream.flush())
    whole = decode_audio(data, fmt, input_rate=8000, rate=OUT)
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)


def test_bad_raw_parameters():
    with pytest.raises(AudioError):
        decode_audio(b"\x00\x01\x02", "pcm16")          # half a sample
    with pytest.raises(AudioError):
        decode_audio(b"\x00\x01", "pcm16", input_rate=0)
    with pytest.raises(AudioError):
        RawStreamDecoder("wav")
    with pytest.raises(ValueError):
        decode_audio(b"\x00\x01", "pcm16", rate=-1)
