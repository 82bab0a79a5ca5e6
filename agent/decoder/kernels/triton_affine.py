"""Triton kernels for integer weights with per-group factors: the GGUF file's own blocks
(native.py) and the 8-bit output head (q8.py), so that the GPU multiplies the very values
the CPU kernels do, nothing rounded twice.

Every layout here is w = scale[group] * q + offset[32-column group]:

    "u4"    q in [0, 15], packed as NF4 packs codes: in each 64-weight block byte j holds
            weight j (low nibble) and weight j + 32 (high nibble); scales per 32
    "i8"    q int8, scales per 32;  "i8x16": per 16;  Q8Weight: per 64, no offsets

The kernels walk K in 32-column groups (the offsets' granularity and the common divisor of
every scale group), so one kernel body serves all four: a group's column j reads its byte
(u4: byte (g // 2) * 32 + j, nibble g % 2) and its factors, and the tile of weights is
formed in registers before the products. Two u4 groups share their bytes; the second read
of a byte comes from cache, so DRAM traffic stays one read of the packed weights.

- GEMV for 1-16 rows: all rows share one read of the weights (what decode is bound by),
  split-K by atomic adds where N alone leaves multiprocessors idle.
- A dequantiser to a dense matrix in the activations' dtype, for cuBLAS (more rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from agent.decoder.kernels.interpreter import interpreting, matmul_dtype
from agent.decoder.kernels.triton_gemv import (
    GEMV_MAX_ROWS,
    fits_registers,
    gemv_configs,
    launch,
    program_slice,
    store_rows,
    tuning_bench,
)
from agent.decoder.native import NativeWeight
from agent.decoder.q8 import Q8Weight
from agent.errors import ConfigError

AffineWeight = NativeWeight | Q8Weight


def layout_of(w: AffineWeight) -> tuple[bool, int, bool]:
    """(packed 4-bit, scale group, has offsets) of a weight."""
    if isinstance(w, Q8Weight):
        return False, 64, False
    return w.layout == "u4", w.group, w.offsets is not None


@triton.jit
def _group_weights(qw_ptr, sc_ptr, off_ptr, offs_n, grp, j, mask, row_bytes, sc_stride,
                   off_stride, U4: tl.constexpr, GROUP: tl.constexpr,
                   HAS_OFFSET: tl.constexpr):
    """Float32 weights of 32-column groups `grp` [1, G, 1] (j [1, 1, 32]) of rows `offs_n`
    [BN, 1, 1]: a [BN, G, 32] tile, zero where `mask` is false."""
    rows = offs_n * row_bytes
    if U4:
        packed = tl.load(qw_ptr + rows + (grp // 2) * 32 + j, mask=mask, other=0).to(tl.int32)
        q = tl.where((grp % 2) == 0, packed & 0xF, (packed >> 4) & 0xF).to(tl.float32)
    else:
        q = tl.load(qw_ptr + rows + grp * 32 + j, mask=mask, other=0).to(tl.float32)
    if GROUP == 16:
        s_idx = grp * 2 + j // 16
    elif GROUP == 32:
        s_idx = grp + j * 0
    else:  # 64
        s_idx = grp // 2 + j * 0
    scale = tl.load(sc_ptr + offs_n * sc_stride + s_idx, mask=mask, other=0.0).to(tl.float32)
    w = q * scale
    if HAS_OFFSET:
        off = tl.load(off_ptr + offs_n * off_stride + grp + j * 0, mask=mask,
                      other=0.0).to(tl.float32)
        w += off
    return w


@triton.jit
def _affine_gemv(x_ptr, qw_ptr, sc_ptr, off_ptr, bias_ptr, y_ptr, M, N, K, n_groups,
                 row_bytes, sc_stride, off_stride, stride_xm, stride_ym,
                 U4: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUPS: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[M, N] (+)= x @ W.T for M <= 16. Program (n, s) owns BLOCK_N outputs and the s-th
    of SPLIT_K slices of the 32-column groups; slices meet by atomic adds into a zeroed
    float32 y."""
    pid_k, offs_n, offs_m, mask_n, mask_m, first, last = program_slice(
        M, N, n_groups, BLOCK_M, BLOCK_N, GROUPS, SPLIT_K)
    j = tl.arange(0, 32)[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(first, last, GROUPS):
        grp = g0 + tl.arange(0, GROUPS)  # [G]
        col = grp[:, None] * 32 + tl.arange(0, 32)[None, :]  # [G, 32]
        mask_w = mask_n[:, None, None] & (grp < last)[None, :, None]
        w = _group_weights(qw_ptr, sc_ptr, off_ptr, offs_n[:, None, None], grp[None, :, None],
                           j, mask_w, row_bytes, sc_stride, off_stride, U4, GROUP,
                           HAS_OFFSET)  # [BN, G, 32]
        mask_x = (col < K) & (grp < last)[:, None]  # [G, 32]
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + col[None, :, :],
                    mask=mask_m[:, None, None] & mask_x[None, :, :],
                    other=0.0).to(tl.float32)  # [BM, G, 32]
        prod = x[:, None, :, :] * w[None, :, :, :]  # [BM, BN, G, 32]
        acc += tl.sum(tl.sum(prod, axis=3), axis=2)
    store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _affine_dequantise(qw_ptr, sc_ptr, off_ptr, out_ptr, N, Kp, row_bytes, sc_stride,
                       off_stride, U4: tl.constexpr, GROUP: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """out [N, Kp] = the weights, in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, 32)
    mask = (offs_n < N)[:, None, None] & (grp < Kp // 32)[None, :, None]
    w = _group_weights(qw_ptr, sc_ptr, off_ptr, offs_n[:, None, None], grp[None, :, None],
                       j[None, None, :], mask, row_bytes, sc_stride, off_stride, U4, GROUP,
                       HAS_OFFSET)
    col = grp[None, :, None] * 32 + j[None, None, :]
    tl.store(out_ptr + offs_n[:, None, None] * Kp + col, w.to(out_ptr.dtype.element_ty),
             mask=mask)


_gemv_tuned = triton.autotune(gemv_configs("GROUPS"), key=["BLOCK_M", "N", "K", "U4", "GROUP"],
                              prune_configs_by={"early_config_prune": fits_registers("GROUPS")},
                              reset_to_zero=["y_ptr"], do_bench=tuning_bench)(_affine_gemv)


def _factors(w: AffineWeight) -> tuple[Tensor, Tensor, int, int]:
    scales = w.scales
    offsets = w.offsets if isinstance(w, NativeWeight) and w.offsets is not None else scales
    return scales, offsets, scales.stride(0), offsets.stride(0)


def affine_gemv(x2: Tensor, w: AffineWeight) -> Tensor:
    """x2 [M <= 16, K] @ W.T (+ bias) in float32, then x2's dtype."""
    m, n = x2.shape[0], w.shape[0]
    u4, group, has_offset = layout_of(w)
    kp = w.padded_k
    y = torch.zeros((m, n), dtype=torch.float32, device=x2.device)
    bias = w.bias if w.bias is not None else y
    scales, offsets, sc_stride, off_stride = _factors(w)
    args = (x2, w.qweight, scales, offsets, bias, y, m, n, w.shape[1], kp // 32,
            w.qweight.stride(0), sc_stride, off_stride, x2.stride(0), y.stride(0))
    meta = dict(U4=u4, GROUP=group, HAS_OFFSET=has_offset, HAS_BIAS=w.bias is not None,
                BLOCK_M=triton.next_power_of_2(m))
    launch(_affine_gemv, _gemv_tuned, "GROUPS", args, meta, m, n, kp // 32)
    return y.to(x2.dtype)


def affine_dequantise(w: AffineWeight, dtype: torch.dtype) -> Tensor:
    """The dense weight [N, K] in `dtype`, made on the device by one kernel."""
    n, k = w.shape
    kp = w.padded_k
    u4, group, has_offset = layout_of(w)
    out = torch.empty((n, kp), dtype=dtype, device=w.qweight.device)
    block_n, groups = (64, 8) if interpreting() else (32, 4)
    scales, offsets, sc_stride, off_stride = _factors(w)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp // 32, groups))
    _affine_dequantise[grid](w.qweight, scales, offsets, out, n, kp, w.qweight.stride(0),
                             sc_stride, off_stride, U4=u4, GROUP=group, HAS_OFFSET=has_offset,
                             BLOCK_N=block_n, GROUPS=groups)
    return out[:, :k]


def affine_linear(x: Tensor, w: AffineWeight, gemv_rows: int = 1) -> Tensor:
    """x [..., K] @ W.T + bias for a native or 8-bit weight; output in x's dtype.

    Up to `gemv_rows` rows (at most 16) take the GEMV, more are dequantised for cuBLAS:
    as with NF4 (README, "Triton kernels"), where the GEMV at 16 rows measured 0.07x
    cuBLAS and dequantise + cuBLAS 0.19x, one row is the GEMV's by default."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ConfigError(f"input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0:
        y = torch.empty((0, n), dtype=x.dtype, device=x.device)
    elif m <= min(gemv_rows, GEMV_MAX_ROWS):
        y = affine_gemv(x2, w)
    else:
        dtype = matmul_dtype(x2)
        bias = None if w.bias is None else w.bias.to(dtype)
        y = F.linear(x2.to(dtype), affine_dequantise(w, dtype), bias).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def affine_swiglu(x: Tensor, w: AffineWeight, gemv_rows: int = 1) -> Tensor:
    gate, up = affine_linear(x, w, gemv_rows).chunk(2, dim=-1)
    return F.silu(gate) * up
