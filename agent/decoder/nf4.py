"""NF4 weights: the QLoRA normal-float 4-bit format Parley's kernels read.

Format (every kernel codes against this):

- A weight W [N, K] (out_features, in_features) is cut into blocks of 64 consecutive
  weights along K in each row. K is zero-padded up to a multiple of 64 (`padded_k`); the
  padding quantises to code 7 (0.0), so it adds nothing to any dot product.
- Each block has one scale s (its absmax, stored as float16) and 64 four-bit codes, each
  the index of the codebook entry nearest to w / s.
- Packing, per block of 64 weights: 32 bytes; byte j holds weight j in its LOW nibble and
  weight j + 32 in its HIGH nibble. (Not even/odd pairs: this "split halves" order lets a
  SIMD kernel turn 32 bytes into 64 ordered codes with one AND and one shift.)
  `qweight` is uint8 [N, padded_k // 2]; row n, block b is qweight[n, 32*b : 32*b + 32].
- Double quantisation of the scales (optional): the float scales, flattened row-major, are
  cut into groups of 256; each group stores a float32 offset (its minimum) and a float32
  step ((max - min) / 255), and each scale becomes a uint8 q with
  s' = float16(offset + q * step) (rounded to float16 so kernels read it exactly).
  Codes are always chosen against the scale that dequantisation will use (s' or the
  float16 scale), which is what keeps the error bound below exact.

Error bound (tested): for a block with absmax A and stored scale s, every weight obeys
    |w - s * codebook[code]| <= max(H * s, A - s)
where H = `MAX_HALF_GAP` is the largest half-distance between neighbouring codebook
entries (0.1519, between -1.0 and -0.6962). Proof: if |w| <= s then w / s lies in [-1, 1],
within H of its nearest entry; otherwise w / s is clipped to +-1 and the error is
|w| - s <= A - s. With float16 scales |A - s| <= 2**-11 * A, so the bound is
H * A * (1 + 2**-11) for normal-range scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from agent.decoder.q8 import Q8Weight
from agent.errors import ConfigError

BLOCK = 64  # weights per scale
GROUP = 256  # scales per double-quantisation group
FORMAT_VERSION = 2  # bump when the packing, the scales or the cache layout change

# The 16 NormalFloat4 values of QLoRA (Dettmers et al. 2023), index 7 is exactly 0.
CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

_MIDPOINTS = (CODEBOOK[1:] + CODEBOOK[:-1]) / 2  # 15 decision boundaries
MAX_HALF_GAP = float(((CODEBOOK[1:] - CODEBOOK[:-1]) / 2).max())
SEARCH_FACTORS = tuple(0.6 + 0.05 * i for i in range(9))  # 0.6 .. 1.0


@dataclass
class NF4Weight:
    """One quantised weight matrix. `shape` is the original (N, K) before padding."""

    qweight: Tensor  # uint8 [N, padded_k // 2]
    scales: Tensor  # float16 [N, padded_k // 64], or uint8 when double-quantised
    shape: tuple[int, int]
    scale_offset: Tensor | None = None  # float32 [groups] (double quantisation only)
    scale_step: Tensor | None = None  # float32 [groups]
    bias: Tensor | None = None  # float32 [N]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def padded_k(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def double_quantised(self) -> bool:
        return self.scale_offset is not None

    def block_scales(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The per-block scales as floats [N, padded_k // 64], undoing double quantisation."""
        if not self.double_quantised:
            return self.scales.to(dtype)
        assert self.scale_offset is not None and self.scale_step is not None
        flat = self.scales.reshape(-1).to(torch.float32)  # [N*B]
        group = torch.arange(flat.numel()) // GROUP
        values = self.scale_offset[group] + flat * self.scale_step[group]
        # Rounded to float16 like plain scales, so every kernel reads them exactly.
        return values.reshape(self.scales.shape).to(torch.float16).to(dtype)

    def nbytes(self) -> int:
        """Bytes this weight occupies in memory (codes, scales, double-quant data, bias)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by field name (absent optional fields left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value
        return out


def _pad_k(weight: Tensor) -> Tensor:
    k = weight.shape[1]
    padded = math.ceil(k / BLOCK) * BLOCK
    if padded == k:
        return weight
    return torch.nn.functional.pad(weight, (0, padded - k))


def _double_quantise(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """8-bit scales per group of 256: returns (q uint8, offset, step, dequantised scales)."""
    flat = absmax.reshape(-1)
    groups = math.ceil(flat.numel() / GROUP)
    padded = torch.nn.functional.pad(flat, (0, groups * GROUP - flat.numel()),
                                     value=float("nan")).reshape(groups, GROUP)
    low = torch.nan_to_num(padded, nan=float("inf")).amin(dim=1)  # [G]
    high = torch.nan_to_num(padded, nan=float("-inf")).amax(dim=1)  # [G]
    step = (high - low) / 255
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((padded - low[:, None]) / safe[:, None]).clamp(0, 255)
    q = torch.nan_to_num(q, nan=0.0).reshape(-1)[: flat.numel()]
    group = torch.arange(flat.numel()) // GROUP
    dequant = low[group] + q * step[group]
    return (q.to(torch.uint8).reshape(absmax.shape), low, step,
            dequant.reshape(absmax.shape).to(torch.float16).to(torch.float32))


def _nearest(normed: Tensor) -> Tensor:
    """Codes of the codebook entries nearest to values in [-1, 1]."""
    return torch.bucketize(normed, _MIDPOINTS.to(normed.device)).to(torch.uint8)


def _searched_scales(blocks: Tensor, absmax: Tensor) -> Tensor:
    """Per block, the scale in absmax * SEARCH_FACTORS with the least squared error."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
    normed = blocks / safe  # [N, B, 64] in [-1, 1]
    codebook = CODEBOOK.to(blocks.device)
    best_factor = torch.ones_like(absmax)
    best_err = torch.full_like(absmax, float("inf"))
    for factor in SEARCH_FACTORS:
        values = codebook[_nearest((normed / factor).clamp(-1.0, 1.0)).long()] * factor
        err = (values - normed).pow(2).sum(dim=2)  # [N, B], in units of absmax^2
        better = err < best_err
        best_factor = torch.where(better, factor, best_factor)
        best_err = torch.where(better, err, best_err)
    return absmax * best_factor


def quantise(weight: Tensor, bias: Tensor | None = None, double_quant: bool = False,
             scale_search: bool = False) -> NF4Weight:
    """Quantise a float matrix [N, K] to NF4 (reference implementation, any device).

    `scale_search` picks each block's scale from absmax * SEARCH_FACTORS by least squared
    error instead of taking absmax itself; weights beyond the scale clip to +-1. The error
    bound of the module docstring holds for any scale, so it holds for these too.
    """
    if weight.dim() != 2:
        raise ConfigError(f"NF4 quantises 2-D weights, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ConfigError("cannot quantise a weight holding inf or NaN")
    n, k = weight.shape
    w = _pad_k(weight.detach().to(torch.float32))  # [N, Kp]
    blocks = w.reshape(n, -1, BLOCK)  # [N, B, 64]
    absmax = blocks.abs().amax(dim=2)  # [N, B]
    if scale_search:
        absmax = torch.cat([_searched_scales(blocks[i:i + 4096], absmax[i:i + 4096])
                            for i in range(0, n, 4096)]) if n else absmax
    if absmax.numel() and float(absmax.max()) > torch.finfo(torch.float16).max:
        raise ConfigError("weight magnitude exceeds float16 range; NF4 scales are float16")
    offset: Tensor | None = None
    step: Tensor | None = None
    if double_quant:
        q_scales, offset, step, scale = _double_quantise(absmax)
        stored: Tensor = q_scales
    else:
        stored = absmax.to(torch.float16)
        scale = stored.to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    normed = (blocks / safe[..., None]).clamp(-1.0, 1.0)  # [N, B, 64]
    codes = _nearest(normed)
    codes = torch.where(scale[..., None] > 0, codes, torch.full_like(codes, 7))
    packed = codes[..., :32] | (codes[..., 32:] << 4)  # [N, B, 32]
    return NF4Weight(
        qweight=packed.reshape(n, -1).contiguous(),
        scales=stored.contiguous(),
        shape=(n, k),
        scale_offset=offset,
        scale_step=step,
        bias=None if bias is None else bias.detach().to(torch.float32).contiguous(),
    )


def unpack_codes(qweight: Tensor) -> Tensor:
    """uint8 [N, Kp // 2] -> codes uint8 [N, Kp] in weight order."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 32)
    codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=2)  # [N, B, 64]
    return codes.reshape(n, -1)


def dequantise(w: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float matrix [N, K] the codes and scales stand for (reference implementation)."""
    n, k = w.shape
    values = CODEBOOK.to(w.qweight.device)[unpack_codes(w.qweight).long()]  # [N, Kp]
    scales = w.block_scales(torch.float32)  # [N, B]
    full = values.reshape(n, -1, BLOCK) * scales[..., None]  # [N, B, 64]
    return full.reshape(n, -1)[:, :k].to(dtype)


def error_bound(weight: Tensor, w: NF4Weight) -> Tensor:
    """Per-weight bound [N, K] on |weight - dequantise(w)| (see the module docstring)."""
    n, k = weight.shape
    blocks = _pad_k(weight.to(torch.float32)).reshape(n, -1, BLOCK)
    absmax = blocks.abs().amax(dim=2)  # [N, B]
    scale = w.block_scales(torch.float32)
    bound = torch.maximum(MAX_HALF_GAP * scale, absmax - scale)  # [N, B]
    return bound[..., None].expand(n, -1, BLOCK).reshape(n, -1)[:, :k]


def save(path: Path, weights: dict[str, NF4Weight | Q8Weight],
         extra: dict[str, Tensor] | None = None, meta: dict[str, str] | None = None) -> None:
    """Write quantised weights (NF4, or 8-bit for a head) plus float tensors, atomically."""
    payload: dict[str, object] = {"format_version": FORMAT_VERSION, "meta": dict(meta or {})}
    payload["nf4"] = {
        name: {**w.tensors(), "shape": list(w.shape),
               "kind": "q8" if isinstance(w, Q8Weight) else "nf4"}
        for name, w in weights.items()
    }
    payload["extra"] = dict(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


def load(path: Path, meta: dict[str, str] | None = None,
         ) -> tuple[dict[str, NF4Weight | Q8Weight], dict[str, Tensor]] | None:
    """Read a file written by `save`; None when it is missing, stale or unreadable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if payload.get("format_version") != FORMAT_VERSION:
        return None
    if meta is not None and payload.get("meta") != meta:
        return None
    weights: dict[str, NF4Weight | Q8Weight] = {}
    for name, entry in payload["nf4"].items():
        entry = dict(entry)
        shape = tuple(entry.pop("shape"))
        kind = Q8Weight if entry.pop("kind", "nf4") == "q8" else NF4Weight
        weights[name] = kind(shape=(int(shape[0]), int(shape[1])), **entry)
    return weights, dict(payload["extra"])

