"""Decode client audio of any supported format to mono float32 at a chosen rate.

`decode_audio` takes a whole file or buffer. The rules it applies:

- Container formats (wav, mp3, flac, ogg/opus, webm, aac, m4a) are recognised by their
  bytes. A declared container name is a hint only: clients often label an MP3 "wav" or
  send a file under the wrong extension, so when the bytes are a different supported
  container they are decoded as what they are. Bytes that are no supported container
  fail, whatever name came with them.
- Raw formats (pcm16, g711_ulaw, g711_alaw) have no header, so they are decoded only
  when named, taken literally, at `input_rate` (pcm16: 24 kHz, G.711: 8 kHz by default).
- Every failure is an `AudioError` with a message for the client: empty input, more
  than `max_bytes`, longer than `max_seconds` (checked against the header first and
  again while decoding, so a ten-hour file stops at the limit), no audio stream, corrupt
  data, and files whose structure says they were cut short (see `containers`). A couple
  of undecodable packets in the middle of a file are skipped, as players do; more than
  that (or 2% of the packets), or an undecodable last packet, fails.
- Decoding runs under a wall-clock budget (10 s plus 1/20 of `max_seconds`) checked on
  every read and every packet, so a pathological file cannot hold a worker.
- Output is always finite and within [-1, 1]: NaN in float WAVs becomes silence, and
  filter overshoot is clipped. Channels are averaged to mono.

There is no shared state: call it from any thread (it blocks; keep it off the event loop).

`RawStreamDecoder` decodes raw audio that arrives in chunks (Realtime's
`input_audio_buffer.append`), carrying the resampler state and a split pcm16 sample
between chunks. Opus packets have their own decoder in `agent.audio.opus`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import av
import numpy as np

from agent.audio import containers, g711
from agent.audio.formats import DEFAULT_RAW_RATES, RAW_FORMATS, input_format
from agent.audio.pcm import frame_to_mono
from agent.audio.resample import MAX_RATE, MIN_RATE, StreamingResampler, check_rate, resample
from agent.config import Settings
from agent.errors import AudioError

# PyAV demuxer for each container.
_DEMUXERS = {
    "wav": "wav", "mp3": "mp3", "flac": "flac", "ogg": "ogg",
    "webm": "matroska", "aac": "aac", "m4a": "mp4",
}
_LABELS = {
    "wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "Ogg", "webm": "WebM",
    "aac": "AAC", "m4a": "M4A/MP4", "pcm16": "pcm16", "g711_ulaw": "G.711 µ-law",
    "g711_alaw": "G.711 A-law",
}
# Container walks that spot truncation FFmpeg would decode past silently.
_STRUCTURE_CHECKS = {
    "wav": containers.wav_problem, "ogg": containers.ogg_problem,
    "webm": containers.webm_problem,
}
# Which errors PyAV and FFmpeg raise on bad data (InvalidDataError is both FFmpegError
# and ValueError; a broken header can surface as EOFError, OverflowError or OSError).
_CODEC_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, ArithmeticError, IndexError)
# Undecodable packets skipped before a file counts as corrupt (or 2% of its packets).
_TOLERATED_BAD_PACKETS = 2
# Headroom over max_seconds for header durations (codec padding, rounding).
_LENGTH_SLACK_SECONDS = 0.5


def _time_budget(max_seconds: float) -> float:
    """Wall-clock seconds a decode may take: far above any real file's need."""
    return 10.0 + max_seconds / 20.0


def decode_audio(
    data: bytes,
    fmt: str | None = None,
    *,
    rate: int = 16000,
    input_rate: int | None = None,
    max_seconds: float | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at `rate` from encoded audio.

    `fmt` is an input format name (see `agent.audio.formats`); None means "recognise the
    container". `input_rate` applies to raw formats only. Limits default to
    `Settings.max_audio_seconds` and `Settings.max_audio_bytes`.
    """
    rate = check_rate(rate, "output rate")
    max_seconds = Settings.max_audio_seconds if max_seconds is None else float(max_seconds)
    max_bytes = Settings.max_audio_bytes if max_bytes is None else int(max_bytes)
    data = _as_bytes(data)
    if not data:
        raise AudioError("The audio is empty.")
    if len(data) > max_bytes:
        raise AudioError(f"The audio is {len(data)} bytes; the limit is {max_bytes} bytes.")
    declared = input_format(fmt) if fmt is not None else None
    if declared in RAW_FORMATS:
        samples, source_rate = _decode_raw(data, declared, input_rate, max_seconds)
        return resample(samples, source_rate, rate)
    return _decode_container(data, declared, rate, max_seconds)


def _as_bytes(data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"audio must be bytes, not {type(data).__name__}")
    return bytes(data)


def _raw_rate(fmt: str, input_rate: int | None) -> int:
    source_rate = DEFAULT_RAW_RATES[fmt] if input_rate is None else input_rate
    try:
        return check_rate(source_rate, "input rate")
    except ValueError as exc:
        raise AudioError(f"Invalid input sample rate for {fmt}: {exc}.") from exc


def _decode_raw(
    data: bytes, fmt: str, input_rate: int | None, max_seconds: float
) -> tuple[np.ndarray, int]:
    """(float32 samples, their rate) for headerless pcm16 or G.711 bytes."""
    source_rate = _raw_rate(fmt, input_rate)
    if fmt == "pcm16" and len(data) % 2:
        raise AudioError("pcm16 audio must be a whole number of 2-byte samples; "
                         f"got {len(data)} bytes.")
    count = len(data) // 2 if fmt == "pcm16" else len(data)
    _check_length(count / source_rate, max_seconds)
    return _raw_samples(data, fmt), source_rate


def _raw_samples(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "pcm16":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)
    if fmt == "g711_ulaw":
        return g711.ulaw_decode(data, dtype=np.float32)
    return g711.alaw_decode(data, dtype=np.float32)


def _check_length(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise AudioError(
            f"The audio is longer than the limit of {max_seconds:g} s."
        )


class _GuardedReader(io.RawIOBase):
    """An in-memory file that refuses to be read once the decode's time is up."""

    def __init__(self, data: bytes, deadline: float):
        self._data = memoryview(data)
        self._pos = 0
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise AudioError("Decoding the audio took too long; the file may be malformed.")
        end = len(self._data) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._data[self._pos:end])
        self._pos += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _decode_container(
    data: bytes, declared: str | None, rate: int, max_seconds: float
) -> np.ndarray:
    kind = containers.sniff(data)
    if kind is None:
        if declared is not None:
            raise AudioError(f"The audio is not a valid {_LABELS[declared]} file.")
        raise AudioError(
            "Unrecognised audio: not WAV, MP3, FLAC, Ogg, WebM, AAC or M4A. "
            "Raw pcm16 and G.711 audio need an explicit format."
        )
    check = _STRUCTURE_CHECKS.get(kind)
    problem = check(data) if check else None
    if problem:
        raise AudioError(problem + ".")
    deadline = time.monotonic() + _time_budget(max_seconds)
    try:
        return _demux(data, kind, rate, max_seconds, deadline)
    except AudioError:
        raise
    except MemoryError as exc:
        raise AudioError(f"The {_LABELS[kind]} audio is too large to decode.") from exc
    except _CODEC_ERRORS as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise AudioError(
            f"The {_LABELS[kind]} audio could not be decoded ({reason}); "
            "it may be corrupt or truncated."
        ) from exc


def _declared_seconds(
    kind: str, data: bytes, container: av.container.InputContainer
) -> float | None:
    """The duration the file's header states, when FFmpeg read one (not a bitrate guess)."""
    if kind == "aac" or (kind == "mp3" and not containers.mp3_declares_length(data)):
        return None
    if container.duration is None or container.duration <= 0:
        return None
    return container.duration / av.time_base


def _demux(data: bytes, kind: str, rate: int, max_seconds: float, deadline: float) -> np.ndarray:
    reader = _GuardedReader(data, deadline)
    label = _LABELS[kind]
    with av.open(reader, mode="r", format=_DEMUXERS[kind], metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioError(f"The {label} file has no audio stream.")
        stream = container.streams.best("audio")
        if not isinstance(stream, av.AudioStream):  # e.g. a WAV header with no channels
            raise AudioError(f"The {label} file has no decodable audio stream.")
        declared_seconds = _declared_seconds(kind, data, container)
        if declared_seconds is not None:
            _check_length(declared_seconds - _LENGTH_SLACK_SECONDS, max_seconds)
        collector = _FrameCollector(rate, max_seconds, deadline)
        packets = _decode_packets(container, stream, collector)
        samples = collector.finish()
    if packets.failed > max(_TOLERATED_BAD_PACKETS, packets.total // 50):
        raise AudioError(f"The {label} audio is corrupt: {packets.failed} of its "
                         f"{packets.total} packets could not be decoded.")
    if packets.last_failed or (kind == "mp3" and packets.last is not None
                               and containers.mp3_last_frame_cut(data, *packets.last)):
        raise AudioError(f"The {label} audio is truncated: its last frame is incomplete.")
    if declared_seconds is not None and collector.seconds < declared_seconds * 0.97 - 0.05:
        raise AudioError(
            f"The {label} audio is truncated: its header announces "
            f"{declared_seconds:.2f} s but only {collector.seconds:.2f} s could be decoded."
        )
    if samples.size == 0:
        raise AudioError(f"The {label} file contains no audio samples.")
    return samples


@dataclass
class _PacketCount:
    total: int = 0
    failed: int = 0
    last: tuple[int, int] | None = None     # (byte position, size) of the last packet
    last_failed: bool = False


def _decode_packets(
    container: av.container.InputContainer, stream: av.AudioStream, collector: _FrameCollector
) -> _PacketCount:
    """Decodes every packet into `collector`, skipping a few undecodable ones as players
    do (a glitch mid-file); the caller decides whether the failures are too many."""
    count = _PacketCount()
    for packet in container.demux(stream):
        collector.check_time()
        if packet.size:
            count.total += 1
            count.last = None if packet.pos is None else (packet.pos, packet.size)
        try:
            frames = packet.decode()
        except av.InvalidDataError:
            count.failed += 1
            count.last_failed = True
            continue
        count.last_failed = count.last_failed and not packet.size
        for frame in frames:
            collector.add(frame)
    return count


class _FrameCollector:
    """Turns decoded frames into mono samples at the target rate, enforcing the limits."""

    def __init__(self, rate: int, max_seconds: float, deadline: float):
        self._rate = rate
        self._max_seconds = max_seconds
        self._deadline = deadline
        self._resampler: StreamingResampler | None = None
        self._chunks: list[np.ndarray] = []
        self.seconds = 0.0

    def check_time(self) -> None:
        if time.monotonic() > self._deadline:
            raise AudioError("Decoding the audio took too long; the file may be malformed.")

    def add(self, frame: av.AudioFrame) -> None:
        if frame.samples == 0:
            return
        source_rate = frame.sample_rate
        if not MIN_RATE <= source_rate <= MAX_RATE:
            raise AudioError(f"The audio's sample rate ({source_rate} Hz) is not supported.")
        self.seconds += frame.samples / source_rate
        _check_length(self.seconds, self._max_seconds)
        if self._resampler is None or self._resampler.src_rate != source_rate:
            # A rate change mid-stream (chained Ogg, spliced MP3): finish the old filter.
            self._flush_resampler()
            self._resampler = StreamingResampler(source_rate, self._rate)
        self._chunks.append(self._resampler.process(frame_to_mono(frame)))

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            self._chunks.append(self._resampler.flush())

    def finish(self) -> np.ndarray:
        self._flush_resampler()
        self._resampler = None
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks)


class RawStreamDecoder:
    """Decodes headerless audio arriving in chunks (pcm16 or G.711) to float32 at `rate`.

    A pcm16 sample split across two chunks is carried over, and the resampler keeps its
    state, so decoding a stream chunk by chunk equals decoding it whole. Call `flush()`
    at the end of the stream for the resampler's tail. One instance per stream.
    """

    def __init__(self, fmt: str, *, input_rate: int | None = None, rate: int = 16000):
        self.fmt = input_format(fmt)
        if self.fmt not in RAW_FORMATS:
            raise AudioError(f"{fmt!r} is not a raw audio format ({', '.join(RAW_FORMATS)}).")
        self.input_rate = _raw_rate(self.fmt, input_rate)
        self.rate = check_rate(rate, "output rate")
        self._resampler = StreamingResampler(self.input_rate, self.rate)
        self._carry = b""

    def decode(self, chunk: bytes) -> np.ndarray:
        """Samples for this chunk (some may arrive with the next one, as the filter fills)."""
        data = self._carry + _as_bytes(chunk)
        if self.fmt == "pcm16":
            whole = len(data) - len(data) % 2
            data, self._carry = data[:whole], data[whole:]
        return self._resampler.process(_raw_samples(data, self.fmt))

    def flush(self) -> np.ndarray:
        """The last samples of the stream; the decoder is ready for a new stream after."""
        self._carry = b""
        return self._resampler.flush()
