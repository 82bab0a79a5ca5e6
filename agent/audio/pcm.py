"""Sample conversions: the one place that decides how int16 and float samples map.

Float audio is float32 in [-1, 1]; int16 maps to it by /32768, and back by x32768 with
rounding and clipping, so int16 -> float -> int16 is exact.
"""

from __future__ import annotations

import av
import numpy as np

# PyAV counts a frame's planes by walking FFmpeg's plane pointers until it meets a NULL.
# With 8 or more planar channels that walk runs past the end of the pointer array (a
# crafted AAC file crashed the process this way), so such frames are interleaved by
# FFmpeg first and only ever read as one plane.
_PLANAR_CHANNEL_LIMIT = 8

# Full-scale value of each FFmpeg sample format, for scaling to [-1, 1].
_FULL_SCALE = {
    "u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63, "flt": 1.0, "dbl": 1.0,
}


def to_float32(pcm: np.ndarray) -> np.ndarray:
    """Mono float32 samples in [-1, 1] from int16 or float samples of any float dtype.

    NaN becomes silence and out-of-range values are clipped, so downstream code never
    sees a non-finite sample.
    """
    array = np.asarray(pcm)
    if array.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / np.float32(32768.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected int16 or float samples, got {array.dtype}")
    return clean(array)


def clean(samples: np.ndarray) -> np.ndarray:
    """float32 copy with NaN/inf replaced and every sample clipped to [-1, 1]."""
    out = np.nan_to_num(samples.astype(np.float32, copy=False), nan=0.0, posinf=1.0,
                        neginf=-1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples from int16 (returned as is) or float samples in [-1, 1]."""
    array = np.asarray(pcm)
    if array.dtype == np.int16:
        return array
    scaled = np.round(to_float32(array).astype(np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded PyAV frame as mono float32: the channels' mean, scaled to [-1, 1]."""
    if frame.format.is_planar and frame.layout.nb_channels >= _PLANAR_CHANNEL_LIMIT:
        frame = _interleaved(frame)
    name = frame.format.name.rstrip("p")
    if name not in _FULL_SCALE:
        raise ValueError(f"unexpected sample format {frame.format.name}")
    channels = max(1, frame.layout.nb_channels)
    data = frame.to_ndarray()
    if frame.format.is_planar:
        planes = data.reshape(-1, frame.samples)                      # (channels, samples)
    else:
        planes = data.reshape(frame.samples, -1).T                    # (channels, samples)
    planes = planes[:channels].astype(np.float64)
    if name == "u8":
        planes -= 128.0
    mono = planes.mean(axis=0) / _FULL_SCALE[name]
    return clean(mono.astype(np.float32))


def _interleaved(frame: av.AudioFrame) -> av.AudioFrame:
    """The same samples in one interleaved plane, converted by FFmpeg (not via .planes)."""
    resampler = av.AudioResampler(
        format=frame.format.packed.name, layout=frame.layout, rate=frame.sample_rate
    )
    frame.pts = None
    parts = resampler.resample(frame) + resampler.resample(None)
    if len(parts) != 1:
        raise ValueError("could not interleave a many-channel frame")
    return parts[0]
