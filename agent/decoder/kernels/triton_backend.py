"""The "triton" kernel backend: every quantised linear of the model through Parley's
Triton kernels, attention for new tokens through one more, on CUDA.

    NF4Weight     triton_nf4.py      (decode GEMV; dequantise + cuBLAS or a fused GEMM above)
    NativeWeight  triton_affine.py   (the GGUF's own blocks, as the CPU kernels read them)
    Q8Weight      triton_affine.py   (the 8-bit output head)
    attention     triton_attention.py (RoPE, the float16 KV cache, online softmax)

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (how CI runs the whole model
through them); otherwise the backend needs CUDA. RMSNorm, SiLU and the embedding stay
PyTorch ops on the device: each is one kernel launch there already.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from agent.decoder.kernels.interpreter import interpreting
from agent.decoder.kernels.triton_affine import AffineWeight, affine_linear, affine_swiglu
from agent.decoder.kernels.triton_attention import token_attention
from agent.decoder.kernels.triton_nf4 import (
    Strategy,
    codebook_table,
    triton_linear,
    triton_swiglu,
)
from agent.decoder.native import NativeWeight
from agent.decoder.nf4 import NF4Weight
from agent.decoder.q8 import Q8Weight
from agent.errors import ConfigError

AnyWeight = NF4Weight | NativeWeight | Q8Weight


class TritonBackend:
    name = "triton"
    # Prompt chunks go through PyTorch's fused attention (flash attention on CUDA): the
    # token kernel's one query row per program would leave the tensor cores idle there.
    token_attention_prefill = False

    def __init__(self, device: str | torch.device | None = None,
                 strategy: Strategy | None = None, affine_gemv_rows: int = 1):
        self.strategy = strategy = strategy or Strategy()
        if device is None:
            device = "cpu" if interpreting() else "cuda"
        if torch.device(device).type != "cuda" and not interpreting():
            raise ConfigError("the triton backend needs CUDA (or TRITON_INTERPRET=1 for tests)")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("the triton backend needs CUDA, and torch sees no CUDA device")
        self.device = torch.device(device)
        self.lut = codebook_table(strategy.codebook, self.device)
        # Rows up to which native and 8-bit weights take the GEMV (triton_affine.py).
        self.affine_gemv_rows = affine_gemv_rows

    def prepare(self, w: AnyWeight) -> AnyWeight:
        """Tensors on the backend's device: float16 NF4 scales, float32 bias."""
        if isinstance(w, NativeWeight | Q8Weight):
            return w.to(self.device)
        scales = w.block_scales(torch.float16) if w.double_quantised else w.scales
        return NF4Weight(
            qweight=w.qweight.to(self.device).contiguous(),
            scales=scales.to(device=self.device, dtype=torch.float16).contiguous(),
            shape=w.shape,
            bias=None if w.bias is None else w.bias.to(self.device, torch.float32).contiguous(),
        )

    def linear(self, x: Tensor, w: AnyWeight) -> Tensor:
        return self.bind(w)(x)

    def swiglu(self, x: Tensor, w: AnyWeight) -> Tensor:
        return self.bind(w, swiglu=True)(x)

    def bind(self, w: AnyWeight, swiglu: bool = False) -> Callable[[Tensor], Tensor]:
        ready = self._ready(w)
        if isinstance(ready, NF4Weight):
            fn = triton_swiglu if swiglu else triton_linear
            return partial(_nf4_call, fn, ready, self.lut, self.strategy)
        return partial(_affine_call, affine_swiglu if swiglu else affine_linear, ready,
                       self.affine_gemv_rows)

    def token_attention_kernel(self) -> Callable[..., Tensor]:
        return token_attention

    def _ready(self, w: AnyWeight) -> AnyWeight:
        if w.qweight.device != self.device:
            return self.prepare(w)
        if isinstance(w, NF4Weight) and (w.double_quantised or w.scales.dtype != torch.float16):
            return self.prepare(w)
        return w


def _nf4_call(fn: Callable[[Tensor, NF4Weight, Tensor, Strategy], Tensor], w: NF4Weight,
              lut: Tensor, strategy: Strategy, x: Tensor) -> Tensor:
    return fn(x, w, lut, strategy)


def _affine_call(fn: Callable[[Tensor, AffineWeight, int], Tensor], w: AffineWeight,
                 gemv_rows: int, x: Tensor) -> Tensor:
    return fn(x, w, gemv_rows)
