"""Raw Opus packets (one per WebSocket message) decoded one at a time with libopus.

A browser or phone client can send bare Opus packets, typically 20 ms at 48 kHz, with
no Ogg or WebM framing. PyAV's libopus decoder decodes such packets directly; it keeps
the codec state between packets (Opus frames depend on their predecessors), so one
decoder serves one stream. The output is resampled to `rate` with a streaming filter.
"""

from __future__ import annotations

import av
import numpy as np

from agent.audio.pcm import frame_to_mono
from agent.audio.resample import StreamingResampler, check_rate
from agent.errors import AudioError

_OPUS_RATE = 48000
# RFC 6716: a packet carries at most 120 ms, and a frame at most 1275 bytes.
_MAX_PACKET_BYTES = 6 * 1275 + 7


def _new_codec() -> av.AudioCodecContext:
    for name in ("libopus", "opus"):
        try:
            codec = av.CodecContext.create(name, "r")
        except (av.FFmpegError, ValueError):       # not in this FFmpeg build
            continue
        codec.sample_rate = _OPUS_RATE
        codec.layout = "mono"          # libopus mixes stereo packets down for us
        return codec
    raise AudioError("This build of PyAV has no Opus decoder.")


class OpusPacketDecoder:
    """Decodes a stream of raw Opus packets to mono float32 at `rate`, packet by packet."""

    def __init__(self, rate: int = 16000):
        self.rate = check_rate(rate, "output rate")
        self._codec = _new_codec()
        self._resampler = StreamingResampler(_OPUS_RATE, self.rate)

    def decode(self, packet: bytes) -> np.ndarray:
        """Samples for one packet. A malformed packet raises AudioError and is skipped;
        the stream can continue with the next packet."""
        if not isinstance(packet, bytes | bytearray | memoryview):
            raise TypeError(f"an Opus packet must be bytes, not {type(packet).__name__}")
        packet = bytes(packet)
        if not packet:
            # An empty packet would tell FFmpeg the stream has ended.
            raise AudioError("Empty Opus packet.")
        if len(packet) > _MAX_PACKET_BYTES:
            raise AudioError(f"Opus packet of {len(packet)} bytes is larger than Opus allows.")
        try:
            frames = self._codec.decode(av.Packet(packet))
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise AudioError(f"Invalid Opus packet ({exc}).") from exc
        chunks = [frame_to_mono(frame) for frame in frames if frame.samples]
        if not chunks:
            return self._resampler.process(np.zeros(0, dtype=np.float32))
        return self._resampler.process(np.concatenate(chunks))

    def flush(self) -> np.ndarray:
        """The resampler's last samples at the end of the stream."""
        return self._resampler.flush()

    def reset(self) -> None:
        """Start a new stream (after a gap or a reconnect): fresh codec and filter state."""
        self._codec = _new_codec()
        self._resampler = StreamingResampler(_OPUS_RATE, self.rate)
