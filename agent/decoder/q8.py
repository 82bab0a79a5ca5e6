"""8-bit weights for the output head: int8 per 64-weight block with a float16 scale.

NF4 is too coarse for the head. SmolLM2 ties it to the embedding, and the NF4 error on the
rows of rare tokens lifted emoji from under 1.5% to 4-22% of the first token's
probability mass (measured on support questions), so some replies were emoji only and
had nothing to speak. Eight bits bring it back to the fp32 level for 1.8x the head's
NF4 bytes.

Format (the CPU kernel in kernels/csrc/nf4_cpu.cpp codes against this):
- W [N, K] is zero-padded along K to a multiple of 64 (`padded_k`) and cut into blocks of
  64 consecutive weights per row;
- each block stores one float16 scale s = absmax / 127 and 64 int8 codes
  q = round(w / s), in [-127, 127] (never -128, so |q| fits the kernel's unsigned side);
- `qweight` is int8 [N, padded_k], `scales` float16 [N, padded_k // 64].
|w - s q| <= s / 2 for every weight (plus the float16 rounding of s, ~2**-11 relative).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from agent.errors import ConfigError

BLOCK = 64


@dataclass
class Q8Weight:
    qweight: Tensor  # int8 [N, padded_k]
    scales: Tensor  # float16 [N, padded_k // 64]
    shape: tuple[int, int]
    bias: Tensor | None = None  # float32 [N]

    @property
    def padded_k(self) -> int:
        return self.qweight.shape[1]

    def to(self, device: torch.device | str) -> Q8Weight:
        """Contiguous tensors on `device`: float16 scales, float32 bias (what kernels read)."""
        return Q8Weight(qweight=self.qweight.to(device).contiguous(),
                        scales=self.scales.to(device, torch.float16).contiguous(),
                        shape=self.shape, bias=None if self.bias is None
                        else self.bias.to(device, torch.float32).contiguous())

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantise(weight: Tensor, bias: Tensor | None = None) -> Q8Weight:
    if weight.dim() != 2:
        raise ConfigError(f"8-bit quantisation takes 2-D weights, got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ConfigError("cannot quantise a weight holding inf or NaN")
    n, k = weight.shape
    padded = -(-k // BLOCK) * BLOCK
    w = torch.nn.functional.pad(weight.detach().to(torch.float32), (0, padded - k))
    blocks = w.reshape(n, -1, BLOCK)
    scales = (blocks.abs().amax(dim=2) / 127).to(torch.float16)  # [N, B]
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8)
    return Q8Weight(qweight=q.reshape(n, padded).contiguous(), scales=scales.contiguous(),
                    shape=(n, k),
                    bias=None if bias is None else bias.detach().to(torch.float32).contiguous())


def dequantise(w: Q8Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    n, k = w.shape
    blocks = w.qweight.reshape(n, -1, BLOCK).to(torch.float32)
    full = blocks * w.scales.to(torch.float32)[..., None]
    return full.reshape(n, -1)[:, :k].to(dtype)
