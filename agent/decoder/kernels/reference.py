"""The reference backend: dequantise the NF4 weight, then a float32 matmul.

Slow on purpose (it dequantises on every call); every other backend is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from agent.decoder import native, nf4, q8
from agent.decoder.kernels import AnyWeight
from agent.decoder.native import NativeWeight
from agent.decoder.nf4 import NF4Weight
from agent.decoder.q8 import Q8Weight


def dense(w: NF4Weight | Q8Weight | NativeWeight) -> Tensor:
    """The float32 matrix a quantised weight stands for."""
    if isinstance(w, NativeWeight):
        return native.dequantise(w)
    return q8.dequantise(w) if isinstance(w, Q8Weight) else nf4.dequantise(w, torch.float32)


def reference_linear(x: Tensor, w: NF4Weight | Q8Weight | NativeWeight) -> Tensor:
    weight = dense(w).to(x.device)  # [N, K]
    y = x.to(torch.float32) @ weight.T  # [..., N]
    if w.bias is not None:
        y = y + w.bias.to(device=x.device, dtype=torch.float32)
    return y.to(x.dtype)


def reference_swiglu(x: Tensor, w: AnyWeight) -> Tensor:
    gate, up = reference_linear(x.to(torch.float32), w).chunk(2, dim=-1)  # [..., F] each
    return (F.silu(gate) * up).to(x.dtype)


class ReferenceBackend:
    name = "reference"

    def prepare(self, w: AnyWeight) -> AnyWeight:
        return w

    def linear(self, x: Tensor, w: AnyWeight) -> Tensor:
        return reference_linear(x, w)

    def swiglu(self, x: Tensor, w: AnyWeight) -> Tensor:
        return reference_swiglu(x, w)

    def bind(self, w: AnyWeight, swiglu: bool = False) -> Callable[[Tensor], Tensor]:
        fn = reference_swiglu if swiglu else reference_linear
        return lambda x: fn(x, w)

