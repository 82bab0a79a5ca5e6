"""The GGUF file's own quantised weights, laid out for the CPU kernels without rounding.

Re-quantising a 4-bit GGUF to NF4 rounds every weight a second time (SmolLM2's Q4_1
lost half its correct answers that way). Here each block type is unpacked to the integer
values and per-block factors the file holds, so that

    w = scale[g] * q + offset[h]

gives, in float32, exactly what `gguf.quants.dequantize` gives (±0 aside: Q4_0's
d * 8 + (-8 d) is +0 where d * (8 - 8) may be -0). Two layouts (csrc/native_tiles.h):

- "u4": q in [0, 15], packed as NF4 packs codes (64-weight blocks, byte j = weight j in
  the low nibble, weight j + 32 in the high one): Q4_0 (offset -8 d), Q4_1, Q4_K;
- "i8": q as int8 (Q5_0 as q - 16, Q5_1, Q5_K, Q8_0), one scale per 32 weights;
  "i8x16": the same with one scale per 16 (Q6_K's sub-blocks).

Offsets, where a type has them, come per 32 weights. Scales and offsets are float16 when
every value survives the round trip exactly (Q4_0/Q4_1/Q5_x/Q8_0 store float16 factors),
else float32 (a K-quant's d * sc is a 17-bit product). K is zero-padded to a multiple of
64 and each row's scales to a multiple of eight entries; padding has scale 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from agent.errors import ConfigError

Q = GGMLQuantizationType
LAYOUTS = ("u4", "i8", "i8x16")
# The block types this module reads, and the layout each lands in.
LAYOUT_OF = {Q.Q4_0: "u4", Q.Q4_1: "u4", Q.Q4_K: "u4", Q.Q5_0: "i8", Q.Q5_1: "i8",
             Q.Q5_K: "i8", Q.Q8_0: "i8", Q.Q6_K: "i8x16"}
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass
class NativeWeight:
    """One weight matrix in a native layout. `shape` is (N, K) before padding."""

    layout: str
    qweight: Tensor  # u4: uint8 [N, Kp // 2]; i8*: int8 [N, Kp]
    scales: Tensor  # float16 | float32 [N, pad8(Kp // group)]
    shape: tuple[int, int]
    offsets: Tensor | None = None  # same dtype as scales, [N, pad8(Kp // 32)]
    bias: Tensor | None = None  # float32 [N]
    source: str = ""  # the GGUF type(s) it came from

    @property
    def group(self) -> int:
        return 16 if self.layout == "i8x16" else 32

    @property
    def padded_k(self) -> int:
        return self.qweight.shape[1] * (2 if self.layout == "u4" else 1)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> NativeWeight:
        """Contiguous tensors on `device` (float32 bias), what the kernels read."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device).contiguous()
        bias = None if self.bias is None else self.bias.to(device, torch.float32).contiguous()
        return NativeWeight(self.layout, self.qweight.to(device).contiguous(),
                            self.scales.to(device).contiguous(), self.shape,
                            move(self.offsets), bias, self.source)


# --- unpacking GGUF blocks to (q, scale, offset) ------------------------------------------

def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[.., 16] bytes of a 32-weight block -> [.., 32]: low nibbles first, then high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[.., 4] bytes (a little-endian uint32) -> [.., 32] bits, bit j for weight j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> ([.., 8], [.., 8])."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low(qs: np.ndarray) -> np.ndarray:
    """K-quant 4-bit fields [.., 128] -> [.., 256]: each 32 bytes give 64 weights."""
    c = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.concatenate([c & 0x0F, c >> 4], axis=-1).reshape(*qs.shape[:-1], 256)


Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # q [R, K], scale [R, K/G], off


def _unpack(blocks: np.ndarray, qtype: Q) -> Unpacked:
    """blocks: uint8 [R, n_blocks, type_size] -> integer values, scales and offsets."""
    r = blocks.shape[0]

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(r, -1)

    if qtype in (Q.Q4_0, Q.Q4_1):
        d = _f16(blocks[..., 0:2])
        start = 2 if qtype == Q.Q4_0 else 4
        q = _nibbles32(blocks[..., start:start + 16])
        off = -8.0 * d if qtype == Q.Q4_0 else _f16(blocks[..., 2:4])
        return flat(q), flat(d), flat(off.astype(np.float32))
    if qtype in (Q.Q5_0, Q.Q5_1):
        d = _f16(blocks[..., 0:2])
        start = 2 if qtype == Q.Q5_0 else 4
        high = _bits32(blocks[..., start:start + 4])
        q = (_nibbles32(blocks[..., start + 4:start + 20]) | (high << 4)).astype(np.int16)
        if qtype == Q.Q5_0:
            return flat(q - 16), flat(d), None
        return flat(q), flat(d), flat(_f16(blocks[..., 2:4]))
    if qtype == Q.Q8_0:
        return flat(blocks[..., 2:34].copy().view(np.int8)), flat(_f16(blocks[..., 0:2])), None
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _k_scale_min(blocks[..., 4:16])
        scale = d[..., None] * sc  # [R, n, 8], float32 as gguf computes it
        off = -(dmin[..., None] * mn)
        if qtype == Q.Q4_K:
            q = _k_low(blocks[..., 16:144])
        else:
            qh = blocks[..., 16:48]  # bit i of byte j: weight j of sub-block i
            high = np.stack([(qh >> i) & 1 for i in range(8)], axis=-2).reshape(r, -1, 256)
            q = _k_low(blocks[..., 48:176]) | (high << 4)
        return flat(q), flat(scale), flat(off)
    if qtype == Q.Q6_K:
        ql, qh = blocks[..., 0:128], blocks[..., 128:192]
        sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
        d = _f16(blocks[..., 208:210])
        shifted = ql.reshape(r, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(
            1, 1, 1, 2, 1)
        low = (shifted & 0x0F).reshape(r, -1, 8, 32)
        high = qh.reshape(r, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
            1, 1, 1, 4, 1)
        high = (high & 0x03).reshape(r, -1, 8, 32)
        q = (low | (high << 4)).astype(np.int16) - 32
        return flat(q), flat(d[..., None] * sc), None
    raise ConfigError(f"quant type {qtype.name} has no native layout")


def _fits_half(*arrays: np.ndarray | None) -> bool:
    return all(a is None or np.array_equal(a.astype(np.float16).astype(np.float32), a)
               for a in arrays)


def _rows(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad the last axis of [R, n] to `width`."""
    return np.pad(values, ((0, 0), (0, width - values.shape[1])))


def from_blocks(raw: np.ndarray, qtype: Q, shape: tuple[int, int],
                bias: Tensor | None = None) -> NativeWeight:
    """A native weight from a GGUF tensor's bytes, uint8 [N, bytes per row]."""
    if qtype not in LAYOUT_OF:
        raise ConfigError(f"quant type {qtype.name} has no native layout")
    n, k = shape
    block, size = GGML_QUANT_SIZES[qtype]
    if k % block or raw.shape != (n, k // block * size):
        raise ConfigError(f"{qtype.name} tensor bytes {raw.shape} do not match shape {shape}")
    q, scale, off = _unpack(np.ascontiguousarray(raw).reshape(n, k // block, size), qtype)
    layout = LAYOUT_OF[qtype]
    group = 16 if layout == "i8x16" else 32
    kp = -(-k // 64) * 64
    dtype = np.float16 if _fits_half(scale, off) else np.float32
    q = _rows(q, kp)
    if layout == "u4":
        b = q.astype(np.uint8).reshape(n, kp // 64, 64)
        codes = torch.from_numpy((b[..., :32] | (b[..., 32:] << 4)).reshape(n, kp // 2).copy())
    else:
        codes = torch.from_numpy(q.astype(np.int8))
    scales = torch.from_numpy(_rows(scale, _pad8(kp // group)).astype(dtype))
    offsets = None if off is None else torch.from_numpy(_rows(off, _pad8(kp // 32)).astype(dtype))
    return NativeWeight(layout, codes.contiguous(), scales.contiguous(), (n, k), offsets,
                        None if bias is None else bias.detach().float().contiguous(),
                        qtype.name)


def values(w: NativeWeight) -> Tensor:
    """The integer values q [N, Kp] (int16), unpacked."""
    if w.layout == "u4":
        n = w.qweight.shape[0]
        b = w.qweight.reshape(n, -1, 32)
        return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, -1).to(torch.int16)
    return w.qweight.to(torch.int16)


def dequantise(w: NativeWeight) -> Tensor:
    """The float32 matrix [N, K]: scale * q (+ offset), as the file's dequantiser gives."""
    k = w.shape[1]
    kp = w.padded_k
    q = values(w).to(torch.float32)
    scale = w.scales.float()[:, :kp // w.group].repeat_interleave(w.group, dim=1)
    out = scale * q
    if w.offsets is not None:
        out = out + w.offsets.float()[:, :kp // 32].repeat_interleave(32, dim=1)
    return out[:, :k].contiguous()


def concat_rows(parts: list[NativeWeight]) -> NativeWeight:
    """Parts stacked along N (a fused wqkv or gate/up), in one layout that holds them all.

    Different layouts meet in the widest: u4 values fit int8, and per-32 scales repeat
    into per-16 ones; float16 factors widen to float32 where any part needs it. Lossless.
    """
    if len(parts) == 1:
        return parts[0]
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        raise ConfigError("fused weights must share in_features")
    layout = max((p.layout for p in parts), key=LAYOUTS.index)
    dtype = torch.float32 if any(p.scales.dtype == torch.float32 for p in parts) \
        else torch.float16
    with_offsets = any(p.offsets is not None for p in parts)
    moved = [_as_layout(p, layout, dtype, with_offsets) for p in parts]
    biases = [p.bias for p in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [torch.zeros(p.shape[0]) if b is None else b for p, b in zip(parts, biases, strict=True)])
    return NativeWeight(
        layout, torch.cat([p.qweight for p in moved]).contiguous(),
        torch.cat([p.scales for p in moved]).contiguous(), (sum(p.shape[0] for p in parts), k),
        torch.cat([p.offsets for p in moved]).contiguous() if with_offsets else None,  # type: ignore[misc]
        bias, "+".join(dict.fromkeys(p.source for p in parts)))


def _as_layout(w: NativeWeight, layout: str, dtype: torch.dtype,
               with_offsets: bool) -> NativeWeight:
    n, kp = w.shape[0], w.padded_k
    qweight = w.qweight if layout == w.layout else values(w).to(torch.int8)
    scales = w.scales[:, :kp // w.group]
    if layout == "i8x16" and w.group == 32:
        scales = scales.repeat_interleave(2, dim=1)
    group = 16 if layout == "i8x16" else 32
    scales = torch.nn.functional.pad(scales.to(dtype), (0, _pad8(kp // group) - scales.shape[1]))
    offsets = w.offsets
    if with_offsets and offsets is None:
        offsets = torch.zeros(n, _pad8(kp // 32), dtype=dtype)
    return NativeWeight(layout, qweight.contiguous(), scales.contiguous(), w.shape,
                        None if offsets is None else offsets.to(dtype).contiguous(), w.bias,
                        w.source)
