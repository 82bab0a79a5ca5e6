"""Test signals and measurements shared by the audio tests (not a test module)."""

from __future__ import annotations

import io
import itertools
import struct

import av
import numpy as np


def chirp_mix(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A rising chirp plus two steady tones, peak about 0.6: exercises the whole band."""
    t = np.arange(int(rate * seconds)) / rate
    top = min(0.4 * rate, 8000.0)
    sweep = np.sin(2 * np.pi * (100.0 * t + (top - 100.0) * t * t / (2 * seconds)))
    tones = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.3 * np.sin(2 * np.pi * 1330.0 * t)
    return (0.3 * sweep + 0.3 * tones).astype(np.float32)


def speech_like(rate: int, seconds: float = 1.5, seed: int = 7) -> np.ndarray:
    """Voiced syllables (a gliding pitch with formant-shaped harmonics) and noisy
    fricatives between them, under a syllable-rate envelope: speech's broad structure."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    pitch = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)              # Hz, gliding
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = np.zeros(n)
    for harmonic in range(1, 30):
        freq = harmonic * 120.0
        if freq > 0.45 * rate:
            break
        weight = sum(np.exp(-((freq - f) / 150.0) ** 2) for f in (700.0, 1200.0, 2600.0))
        voiced += (0.2 + weight) / harmonic * np.sin(harmonic * phase)
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))              # 4 syllables/s
    fricative = rng.standard_normal(n) * (syllables < 0.1)
    signal = voiced * syllables + 0.05 * fricative
    return (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)


def align(reference: np.ndarray, test: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The overlapping parts of `reference` and `test` after the best delay of `test`
    (0..max_lag samples, found by cross-correlation): codecs add start delays."""
    size = 1 << int(np.ceil(np.log2(len(reference) + len(test))))
    spectrum = np.fft.rfft(test, size) * np.conj(np.fft.rfft(reference, size))
    correlation = np.fft.irfft(spectrum, size)[: max_lag + 1]
    lag = int(np.argmax(correlation))
    shifted = test[lag:]
    length = min(len(reference), len(shifted))
    return reference[:length], shifted[:length]


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio of `test` against `reference`, in dB."""
    noise = np.sum((reference.astype(np.float64) - test) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-20)))


def band_levels_db(signal: np.ndarray, rate: int, top: float) -> np.ndarray:
    """Energy (dB) in third-octave bands from 100 Hz to `top` Hz."""
    spectrum = np.abs(np.fft.rfft(signal.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(signal), 1 / rate)
    edges = 100.0 * 2.0 ** (np.arange(0, 40) / 3)
    edges = edges[edges <= top]
    return np.array([
        10 * np.log10(np.sum(spectrum[(freqs >= lo) & (freqs < hi)]) + 1e-12)
        for lo, hi in itertools.pairwise(edges)
    ])


def peak_frequency(signal: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the strongest FFT bin."""
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


def tone(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_file(
    channels: np.ndarray, rate: int, bits: int, *, floating: bool = False,
    extensible: bool = False,
) -> bytes:
    """A WAV file written by hand (not by FFmpeg) from float `channels` (C, N) in [-1, 1]."""
    channels = np.atleast_2d(channels)
    count = channels.shape[0]
    interleaved = channels.T.reshape(-1).astype(np.float64)
    if floating:
        body = interleaved.astype("<f4" if bits == 32 else "<f8").tobytes()
    elif bits == 8:
        body = np.clip(np.round(interleaved * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    else:
        full = 2.0 ** (bits - 1)
        ints = np.clip(np.round(interleaved * full), -full, full - 1).astype("<i4")
        width = bits // 8
        body = ints.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()   # little-endian
    block = count * bits // 8
    tag = 3 if floating else 1
    if extensible:
        guid = struct.pack("<IHH", tag, 0x0000, 0x0010) + bytes.fromhex("800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, count, rate, rate * block, block, bits,
                          22, bits, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, count, rate, rate * block, block, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack(
        "<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


class _Unseekable:
    """A write-only file, as a live stream or a socket: muxers cannot go back."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self.buffer.write(data)


def pyav_file(
    channels: np.ndarray, rate: int, muxer: str, codec: str, *, bit_rate: int | None = None,
    seekable: bool = True,
) -> bytes:
    """A file muxed by PyAV directly (independent of agent.audio.encode). Unseekable
    output is what live recorders produce (WebM with unknown sizes, no MP3 Xing header)."""
    channels = np.atleast_2d(channels).astype(np.float32)
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    target = io.BytesIO() if seekable else _Unseekable()
    buffer = target if isinstance(target, io.BytesIO) else target.buffer
    with av.open(target, mode="w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        for start in range(0, channels.shape[1], 4096):
            block = np.ascontiguousarray(channels[:, start:start + 4096])
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def multichannel_file(muxer: str, codec: str, layout: str, rate: int, seconds: float) -> tuple[
        bytes, np.ndarray]:
    """(file, the channels' mean): channel k holds a (200 + 100k) Hz tone, the LFE channel
    80 Hz (encoders low-pass it). Frames go in interleaved, since PyAV cannot fill planar
    frames of 8+ channels."""
    names = [channel.name for channel in av.AudioLayout(layout).channels]
    freqs = [80.0 if name == "LFE" else 200.0 + 100.0 * k for k, name in enumerate(names)]
    t = np.arange(round(rate * seconds)) / rate
    channels = np.stack([0.3 * np.sin(2 * np.pi * freq * t) for freq in freqs])
    channels = channels.astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        interleaved = np.ascontiguousarray(channels.T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue(), channels.mean(axis=0)
