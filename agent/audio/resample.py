"""Sample-rate conversion with soxr (a proper band-limited filter, not interpolation).

`resample` converts a whole buffer. `StreamingResampler` converts audio that arrives in
chunks (a WebSocket, a TTS stream): it keeps the filter's state between chunks, so the
output has no seams at chunk boundaries and, after `flush()`, matches `resample` on the
concatenated input. Neither is shared between threads; make one per stream.
"""

from __future__ import annotations

import numpy as np
import soxr

from agent.audio.pcm import clean, to_float32

MIN_RATE = 1000
MAX_RATE = 768000
_QUALITY = "HQ"


def check_rate(rate: int, what: str = "sample rate") -> int:
    """`rate` as an int, or ValueError when it is not a usable audio rate."""
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{what} {rate} is outside {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Mono float32 `pcm` at `src_rate` converted to `dst_rate` (int16 input accepted)."""
    src_rate, dst_rate = check_rate(src_rate), check_rate(dst_rate)
    samples = to_float32(pcm)
    if src_rate == dst_rate or samples.size == 0:
        return samples.copy()
    # Filter ripple can push a full-scale sample slightly past 1.0.
    return clean(soxr.resample(samples, src_rate, dst_rate, quality=_QUALITY))


class StreamingResampler:
    """Resamples chunked mono audio; `process` each chunk, then `flush` once at the end."""

    def __init__(self, src_rate: int, dst_rate: int):
        self.src_rate = check_rate(src_rate)
        self.dst_rate = check_rate(dst_rate)
        self._stream = (
            None if self.src_rate == self.dst_rate
            else soxr.ResampleStream(self.src_rate, self.dst_rate, 1, dtype="float32",
                                     quality=_QUALITY)
        )

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """The output available so far for this chunk (may be empty while the filter fills)."""
        samples = to_float32(pcm)
        if self._stream is None:
            return samples.copy()
        return clean(self._stream.resample_chunk(np.ascontiguousarray(samples)))

    def flush(self) -> np.ndarray:
        """The filter's remaining output. The resampler can be reused afterwards."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return clean(tail)
