"""Triton NF4 kernels for CUDA: a dequant-fused GEMV for decode and a GEMM for prefill.

Both read the packed codes and float16 scales of agent/decoder/nf4.py directly and
dequantise a [BLOCK_N, BLOCK_K] tile in registers (codebook gather times block scale):
the float weight never exists in memory.

- GEMV (1-16 activation rows): each program owns BLOCK_N output features and walks K,
  multiplying the dequantised tile with every activation row by a broadcast-and-sum; all
  rows share one read of the weights, which is what decode is bound by.
- GEMM (more rows): tiles of [BLOCK_M, BLOCK_N] with `tl.dot` (tensor cores on CUDA).

The tests run these kernels on the CPU with TRITON_INTERPRET=1 (set before this module is
imported). On CUDA, activations in float16/bfloat16 go through `tl.dot` in that precision
with float32 accumulation; float32 activations use TF32 there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from agent.decoder.nf4 import BLOCK, CODEBOOK, NF4Weight
from agent.errors import ConfigError

GEMV_MAX_ROWS = 16


@triton.jit
def _dequant_tile(qw_ptr, sc_ptr, lut_ptr, offs_n, offs_k, row_bytes, n_blocks, mask_n,
                  Kp):
    """Float32 weights [BLOCK_N, BLOCK_K] for output rows offs_n and input columns offs_k."""
    blk = offs_k // 64
    within = offs_k % 64
    byte = blk * 32 + within % 32  # split-half packing: low nibble j, high nibble j + 32
    shift = (within // 32) * 4
    mask = mask_n[:, None] & (offs_k[None, :] < Kp)
    packed = tl.load(qw_ptr + offs_n[:, None] * row_bytes + byte[None, :], mask=mask, other=0)
    codes = (packed.to(tl.int32) >> shift[None, :]) & 0xF
    values = tl.load(lut_ptr + codes)
    scale = tl.load(sc_ptr + offs_n[:, None] * n_blocks + blk[None, :], mask=mask, other=0.0)
    return values * scale.to(tl.float32)


@triton.jit
def _nf4_gemv(x_ptr, qw_ptr, sc_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, Kp, stride_xm,
              stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(qw_ptr, sc_ptr, lut_ptr, offs_n, offs_k, Kp // 2, Kp // 64,
                          mask_n, Kp)  # [BN, BK]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nf4_gemm(x_ptr, qw_ptr, sc_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, Kp, stride_xm,
              stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(qw_ptr, sc_ptr, lut_ptr, offs_n, offs_k, Kp // 2, Kp // 64,
                          mask_n, Kp)  # [BN, BK]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_linear(x: Tensor, w: NF4Weight, lut: Tensor) -> Tensor:
    """x [..., K] @ dequant(W).T + bias, W [N, K]; output in x's dtype."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ConfigError(f"input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bias = w.bias if w.bias is not None else y  # unused pointer when HAS_BIAS is False
    common = dict(HAS_BIAS=w.bias is not None)
    if m <= GEMV_MAX_ROWS:
        block_m = triton.next_power_of_2(m)
        # The broadcast product holds BLOCK_M * BLOCK_N * BLOCK_K values: keep it near 16K.
        block_n = 32 if _interpreting() else max(16, 128 // block_m)
        grid = (triton.cdiv(n, block_n),)
        _nf4_gemv[grid](x2, w.qweight, w.scales, lut, bias, y, m, n, k, w.padded_k,
                        x2.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=BLOCK, **common)
    else:
        block_m, block_n = (32, 32) if _interpreting() else (64, 64)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _nf4_gemm[grid](x2, w.qweight, w.scales, lut, bias, y, m, n, k, w.padded_k,
                        x2.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=BLOCK, **common)
    return y.reshape(*x.shape[:-1], n)


def triton_swiglu(x: Tensor, w: NF4Weight, lut: Tensor) -> Tensor:
    gate, up = triton_linear(x, w, lut).chunk(2, dim=-1)  # [..., F] each
    return F.silu(gate) * up


class TritonBackend:
    name = "triton"

    def __init__(self, device: str | torch.device | None = None):
        if device is None:
            device = "cpu" if _interpreting() else "cuda"
        if torch.device(device).type != "cuda" and not _interpreting():
            raise ConfigError("the triton backend needs CUDA (or TRITON_INTERPRET=1 for tests)")
        self.device = torch.device(device)
        self.lut = CODEBOOK.to(self.device)

    def prepare(self, w: NF4Weight) -> NF4Weight:
        """Tensors on the backend's device, float16 scales, float32 bias."""
        scales = w.block_scales(torch.float16) if w.double_quantised else w.scales
        return NF4Weight(
            qweight=w.qweight.to(self.device).contiguous(),
            scales=scales.to(device=self.device, dtype=torch.float16).contiguous(),
            shape=w.shape,
            bias=None if w.bias is None else w.bias.to(self.device, torch.float32).contiguous(),
        )

    def linear(self, x: Tensor, w: NF4Weight) -> Tensor:
        return triton_linear(x, self._ready(w), self.lut)

    def swiglu(self, x: Tensor, w: NF4Weight) -> Tensor:
        return triton_swiglu(x, self._ready(w), self.lut)

    def bind(self, w: NF4Weight, swiglu: bool = False) -> Callable[[Tensor], Tensor]:
        fn = triton_swiglu if swiglu else triton_linear
        return partial(_call, fn, self._ready(w), self.lut)

    def _ready(self, w: NF4Weight) -> NF4Weight:
        ok = (not w.double_quantised and w.scales.dtype == torch.float16
              and w.qweight.device == self.device)
        return w if ok else self.prepare(w)


def _call(fn: Callable[[Tensor, NF4Weight, Tensor], Tensor], w: NF4Weight, lut: Tensor,
          x: Tensor) -> Tensor:
    return fn(x, w, lut)
