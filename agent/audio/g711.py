"""ITU-T G.711 µ-law and A-law companding, as lookup tables built once with numpy.

Encoding maps every 16-bit sample through a 65536-entry table; decoding maps every code
through a 256-entry table. The tables follow the standard's segment arithmetic: µ-law
works on the top 14 bits with a bias of 33, A-law on the top 13 bits, and both
transmit codes with their standard bit inversions (all bits for µ-law, even bits for
A-law), so the bytes interoperate with telephony gear and OpenAI's `g711_ulaw/alaw`.

Encoders take int16 samples, float samples in [-1, 1], or pcm16 little-endian bytes,
and return the codes as bytes. Decoders take codes as bytes or a uint8 array and return
int16 samples, or float32 in [-1, 1) with `dtype=np.float32`.
"""

from __future__ import annotations

import numpy as np

from agent.audio.pcm import to_int16


def _segment(magnitude: np.ndarray, first_end: int) -> np.ndarray:
    """Segment number 0..8 of each magnitude; segment k ends at first_end * 2**k + ..."""
    ends = (first_end + 1) * (1 << np.arange(8)) - 1           # e.g. 0x3F, 0x7F, ...
    return np.searchsorted(ends, magnitude, side="left")


def _build_ulaw_encode() -> np.ndarray:
    linear = np.arange(-32768, 32768, dtype=np.int32) >> 2       # 14-bit samples
    mask = np.where(linear < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(linear), 8159) + 33              # clip, then bias
    seg = _segment(magnitude, 0x3F)
    code = (seg << 4) | ((magnitude >> (seg + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    table = (code ^ mask).astype(np.uint8)
    return np.roll(table, -32768)                                   # index by uint16 view


def _build_ulaw_decode() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _build_alaw_encode() -> np.ndarray:
    linear = np.arange(-32768, 32768, dtype=np.int32) >> 3       # 13-bit samples
    mask = np.where(linear >= 0, 0xD5, 0x55)
    magnitude = np.where(linear >= 0, linear, -linear - 1)
    seg = _segment(magnitude, 0x1F)
    shift = np.where(seg < 2, 1, seg)
    code = (np.minimum(seg, 7) << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    table = (code ^ mask).astype(np.uint8)
    return np.roll(table, -32768)


def _build_alaw_decode() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (code & 0x70) >> 4
    base = ((code & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    magnitude = np.where(seg > 1, base << np.maximum(seg - 1, 0), base)
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_ULAW_ENCODE = _build_ulaw_encode()
_ULAW_DECODE = _build_ulaw_decode()
_ALAW_ENCODE = _build_alaw_encode()
_ALAW_DECODE = _build_alaw_decode()


def _as_int16(samples: np.ndarray | bytes) -> np.ndarray:
    if isinstance(samples, bytes | bytearray | memoryview):
        if len(samples) % 2:
            raise ValueError("pcm16 bytes must hold a whole number of 2-byte samples")
        return np.frombuffer(samples, dtype="<i2")
    return to_int16(np.asarray(samples))


def _as_codes(codes: np.ndarray | bytes) -> np.ndarray:
    if isinstance(codes, bytes | bytearray | memoryview):
        return np.frombuffer(codes, dtype=np.uint8)
    array = np.asarray(codes)
    if array.dtype != np.uint8:
        raise TypeError(f"G.711 codes must be bytes or uint8, not {array.dtype}")
    return array


def _decoded(samples: np.ndarray, dtype: type | np.dtype) -> np.ndarray:
    if np.dtype(dtype) == np.int16:
        return samples
    return (samples.astype(np.float32) / 32768.0).astype(dtype)


def ulaw_encode(samples: np.ndarray | bytes) -> bytes:
    """µ-law codes for int16 samples, float samples in [-1, 1], or pcm16 LE bytes."""
    return _ULAW_ENCODE[_as_int16(samples).view(np.uint16)].tobytes()


def ulaw_decode(codes: np.ndarray | bytes, dtype: type | np.dtype = np.int16) -> np.ndarray:
    """int16 samples (or float32 in [-1, 1) with dtype=np.float32) for µ-law codes."""
    return _decoded(_ULAW_DECODE[_as_codes(codes)], dtype)


def alaw_encode(samples: np.ndarray | bytes) -> bytes:
    """A-law codes for int16 samples, float samples in [-1, 1], or pcm16 LE bytes."""
    return _ALAW_ENCODE[_as_int16(samples).view(np.uint16)].tobytes()


def alaw_decode(codes: np.ndarray | bytes, dtype: type | np.dtype = np.int16) -> np.ndarray:
    """int16 samples (or float32 in [-1, 1) with dtype=np.float32) for A-law codes."""
    return _decoded(_ALAW_DECODE[_as_codes(codes)], dtype)
