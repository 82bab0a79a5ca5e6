"""Encode mono PCM to the output formats, whole or as a stream of bytes.

`encode_audio` writes a complete file. For the containers it writes to a seekable
buffer, so the muxers fill in what they only know at the end: exact WAV sizes, the MP3
Xing/LAME header (decoders then trim the encoder's delay and padding), the FLAC
STREAMINFO sample count and MD5.

`StreamingEncoder` is for SSE and chunked HTTP responses: `feed` returns the bytes that
exist so far, `close` the rest. Every format streams; what a client receives per feed:

- pcm16, g711_ulaw, g711_alaw: the chunk's samples at once (headerless).
- wav: a 44-byte header first, with the RIFF and data sizes set to 0xFFFFFFFF
  ("unknown length", as streaming servers write it), then the chunk's samples at once.
- mp3: whole MP3 frames (1152 samples) as LAME emits them, about one frame behind. No
  Xing header, so decoders keep LAME's ~1100-sample start delay.
- aac: ADTS frames (1024 samples), about two frames behind; ADTS cannot signal the
  encoder delay, so decoders (in both modes) keep ~1024 samples of leading silence.
- opus: Ogg pages holding up to 100 ms of 20 ms Opus packets; the pre-skip is in the
  Ogg header, so decoders trim the encoder delay.
- flac: the STREAMINFO header first (sample count left unknown), then FLAC frames of
  one block (4608 samples) each.

Audio is resampled to the format's rate first (pcm16 24 kHz, G.711 8 kHz, opus 48 kHz;
wav and flac keep the input rate; mp3 and aac the input rate when the codec allows it,
else the next one up). Encoders are not shared between threads; make one per stream.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np

from agent.audio import g711
from agent.audio.formats import OutputFormat, output_format
from agent.audio.pcm import to_int16
from agent.audio.resample import StreamingResampler, check_rate, resample

# Ogg page length for streamed Opus: short enough for low latency, long enough that the
# 28-byte page headers stay a few percent of the bitrate.
_OGG_PAGE_MICROSECONDS = 100_000
_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM 16-bit mono WAV header; None means "length unknown" (streaming)."""
    data_size = _UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = _UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    fmt_chunk = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, 16-bit
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
            + b"data" + struct.pack("<I", data_size))


def _raw_bytes(fmt: str, samples: np.ndarray) -> bytes:
    if fmt == "g711_ulaw":
        return g711.ulaw_encode(samples)
    if fmt == "g711_alaw":
        return g711.alaw_encode(samples)
    return to_int16(samples).astype("<i2").tobytes()       # pcm16 and wav bodies


class _Sink:
    """A write-only, unseekable file: the muxer streams into it and we drain it."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class _CodecWriter:
    """One PyAV encoder and muxer writing mono float32 frames into `target`."""

    def __init__(self, spec: OutputFormat, rate: int, target: io.BytesIO | _Sink):
        options = {"page_duration": str(_OGG_PAGE_MICROSECONDS)} if spec.muxer == "ogg" else {}
        self._container = av.open(target, mode="w", format=spec.muxer, options=options)
        assert spec.codec is not None, "a raw format has no encoder"
        self._stream: av.AudioStream = self._container.add_stream(  # type: ignore[assignment]
            spec.codec, rate=rate, layout="mono")
        if spec.bit_rate:
            self._stream.codec_context.bit_rate = spec.bit_rate
        self._rate = rate
        self._pts = 0

    def write(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32)[None, :], format="flt",
            layout="mono",
        )
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += samples.size
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))   # drain the encoder's lookahead
        self._container.close()


def encode_audio(pcm: np.ndarray, rate: int, fmt: str) -> bytes:
    """A complete file (or raw buffer) in output format `fmt` from mono samples at `rate`.

    `pcm` is float in [-1, 1] or int16. Raises AudioError for an unknown format.
    """
    spec = output_format(fmt)
    rate = check_rate(rate, "input rate")
    out_rate = spec.rate_for(rate)
    samples = resample(pcm, rate, out_rate)
    if spec.muxer is None:
        body = _raw_bytes(spec.name, samples)
        return wav_header(out_rate, len(body)) + body if spec.name == "wav" else body
    buffer = io.BytesIO()
    writer = _CodecWriter(spec, out_rate, buffer)
    writer.write(samples)
    writer.close()
    return buffer.getvalue()


class StreamingEncoder:
    """Encodes PCM chunks to `fmt`, returning each format's bytes as soon as they exist.

    `feed(pcm)` takes mono float or int16 samples at `input_rate`; `close()` flushes the
    resampler and encoder and returns the final bytes. After close, feed raises.
    """

    def __init__(self, fmt: str, input_rate: int):
        self.format = output_format(fmt)
        self.input_rate = check_rate(input_rate, "input rate")
        self.rate = self.format.rate_for(self.input_rate)
        self.mime = self.format.mime
        self._resampler = StreamingResampler(self.input_rate, self.rate)
        self._sink: _Sink | None = None
        self._writer: _CodecWriter | None = None
        if self.format.muxer is not None:
            self._sink = _Sink()
            self._writer = _CodecWriter(self.format, self.rate, self._sink)
        self._header_pending = self.format.name == "wav"
        self._closed = False

    def feed(self, pcm: np.ndarray) -> bytes:
        """The encoded bytes available after this chunk (possibly empty)."""
        if self._closed:
            raise RuntimeError("StreamingEncoder.feed() after close()")
        return self._encode(self._resampler.process(pcm))

    def close(self) -> bytes:
        """The remaining bytes; the stream is complete after them. Idempotent."""
        if self._closed:
            return b""
        tail = self._encode(self._resampler.flush())
        self._closed = True
        if self._writer is None or self._sink is None:
            return tail
        self._writer.close()
        return tail + self._sink.drain()

    def _encode(self, samples: np.ndarray) -> bytes:
        if self._writer is not None and self._sink is not None:
            self._writer.write(samples)
            return self._sink.drain()
        header = b""
        if self._header_pending:
            header, self._header_pending = wav_header(self.rate, None), False
        return header + _raw_bytes(self.format.name, samples)
