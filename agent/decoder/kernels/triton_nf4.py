"""Triton NF4 kernels for CUDA: dequant-fused GEMV and GEMM, and a dequantiser.

Every kernel reads the packed codes and float16 scales of agent/decoder/nf4.py directly and
turns a tile of bytes into weights in registers (codebook value times block scale).

- GEMV (1-16 activation rows): each program owns BLOCK_N outputs and a slice of K and
  multiplies the weight tile with every row by a broadcast-and-sum; all rows share one
  read of the weights, which is what decode is bound by.
- GEMM (`tl.dot`, tensor cores on CUDA), for more rows or for 2-16 rows padded to 16.
- A dequantiser to a dense matrix in the activations' dtype, which cuBLAS then multiplies.

Which one runs is a `Strategy`. The defaults are the fastest measured on an H200 (README,
"Triton kernels"): the GEMV for one row, dequantise + cuBLAS for more. The fused GEMM loses
there because dequantising in registers starves the tensor cores (~60 TFLOP/s). A codebook
value is gathered from a 16-entry table (`table`), picked by a tree of 15 selects on the
code's bits (`select`, the fastest), or gathered with its byte's other nibble from a
256-entry table of value pairs (`pairs`).

The tests run these kernels on the CPU with TRITON_INTERPRET=1 (set before this module is
imported). On CUDA, activations in float16/bfloat16 go through `tl.dot` in that precision
with float32 accumulation; float32 activations use TF32 there, and the dequantise + cuBLAS
path multiplies them in float16 (`matmul_dtype`: a float32 GEMM runs at a tenth of the
tensor cores' float16 rate), accumulating in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from agent.decoder.nf4 import CODEBOOK, NF4Weight
from agent.errors import ConfigError


@dataclass(frozen=True)
class Strategy:
    decode: str = "dequant"  # 2-16 rows: "gemv", "dot" (tl.dot, 16-row tiles) or "dequant"
    prefill: str = "dequant"  # more rows: "fused" (tl.dot GEMM) or "dequant" (+ cuBLAS)
    codebook: str = "select"  # how a code becomes its value: "select", "table" or "pairs"


CODEBOOK_MODES = {"table": 0, "select": 1, "pairs": 2}


def codebook_table(codebook: str, device: torch.device | str) -> Tensor:
    """The table a codebook mode reads: the 16 values, or 256 byte pairs (int64).

    Pair b holds the float32 bits of the high nibble's value in its upper half and the
    low nibble's in its lower half, so one gather decodes a whole byte exactly.
    """
    if codebook not in CODEBOOK_MODES:
        raise ConfigError(f"unknown codebook mode {codebook!r}")
    if codebook != "pairs":
        return CODEBOOK.to(device)
    bits = CODEBOOK.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [16]
    byte = torch.arange(256)
    return ((bits[byte >> 4] << 32) | bits[byte & 0xF]).to(device)


@triton.jit
def _codebook(codes, lut_ptr, SELECT: tl.constexpr):
    """NF4 values of 4-bit codes (int32), float32."""
    if SELECT:  # 4 levels of selects on the code's bits, the codebook values as constants
        b0 = (codes & 1) != 0
        b1 = (codes & 2) != 0
        b2 = (codes & 4) != 0
        b3 = (codes & 8) != 0
        v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                      tl.where(b0, -0.6961928009986877, -1.0))
        v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                      tl.where(b0, -0.18477343022823334, -0.28444138169288635))
        v2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                      tl.where(b0, 0.16093020141124725, 0.07958029955625534))
        v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                      tl.where(b0, 0.5626170039176941, 0.44070982933044434))
        return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0)).to(tl.float32)
    else:
        return tl.load(lut_ptr + codes)


@triton.jit
def _byte_values(packed, lut_ptr, MODE: tl.constexpr):
    """Float32 weights of both nibbles of `packed` bytes (int32), before the block scale.

    MODE 0 gathers each nibble from the 16-entry codebook, MODE 1 picks it by selects, MODE 2
    gathers both at once from a 256-entry table of float32 pairs (`codebook_table`).
    """
    if MODE == 2:
        pair = tl.load(lut_ptr + packed)  # int64: high nibble's float32 bits << 32 | low's
        low = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        high = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        low = _codebook(packed & 0xF, lut_ptr, MODE == 1)
        high = _codebook(packed >> 4, lut_ptr, MODE == 1)
    return low, high


@triton.jit
def _half_tiles(qw_ptr, sc_ptr, lut_ptr, offs_n, byte, mask_n, row_bytes, n_blocks,
                MODE: tl.constexpr):
    """The weights behind bytes `byte` of rows `offs_n`, as two float32 [BLOCK_N, BYTES] tiles.

    Byte t of a block holds weight t (low nibble) and weight t + 32 (high nibble), so one
    load of the packed bytes gives both halves; `_half_columns` names their input columns.
    """
    blk = byte // 32
    mask = mask_n[:, None] & (byte[None, :] < row_bytes)
    packed = tl.load(qw_ptr + offs_n[:, None] * row_bytes + byte[None, :], mask=mask,
                     other=0).to(tl.int32)
    scale = tl.load(sc_ptr + offs_n[:, None] * n_blocks + blk[None, :], mask=mask,
                    other=0.0).to(tl.float32)  # 0 for masked bytes zeroes their weights
    low, high = _byte_values(packed, lut_ptr, MODE)
    return low * scale, high * scale


@triton.jit
def _half_columns(byte):
    """Input columns of the low and high nibbles of bytes `byte`."""
    low = (byte // 32) * 64 + byte % 32
    return low, low + 32


@triton.jit
def _nf4_gemv(x_ptr, qw_ptr, sc_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, row_bytes, n_blocks,
              stride_xm, stride_ym, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
              SPLIT_K: tl.constexpr):
    """Decode: y[M, N] (+)= x @ W.T for M <= 16, all rows sharing one read of the weights.

    Each step takes BLOCKS whole 64-weight blocks of BLOCK_N rows as a [BN, BLOCKS, 32]
    byte tile, sums every block's products unscaled and applies its scale once. Program
    (n, s) owns BLOCK_N outputs and the s-th of SPLIT_K slices of the blocks; with
    SPLIT_K > 1 the slices meet by atomic adds into a zeroed float32 `y` (what keeps a
    small-N matrix from leaving most multiprocessors idle).
    """
    pid_k, offs_n, offs_m, mask_n, mask_m, first, last = program_slice(
        M, N, n_blocks, BLOCK_M, BLOCK_N, BLOCKS, SPLIT_K)
    j = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for blk0 in range(first, last, BLOCKS):
        blk = blk0 + tl.arange(0, BLOCKS)  # [NB]
        mask_b = blk < n_blocks
        byte = blk[None, :, None] * 32 + j[None, None, :]  # [1, NB, 32]
        packed = tl.load(qw_ptr + offs_n[:, None, None] * row_bytes + byte,
                         mask=mask_n[:, None, None] & mask_b[None, :, None],
                         other=0).to(tl.int32)  # [BN, NB, 32]
        scale = tl.load(sc_ptr + offs_n[:, None] * n_blocks + blk[None, :],
                        mask=mask_n[:, None] & mask_b[None, :], other=0.0).to(tl.float32)
        low, high = _byte_values(packed, lut_ptr, MODE)
        col = blk[:, None] * 64 + j[None, :]  # [NB, 32]: low nibbles' columns
        x_rows = x_ptr + offs_m[:, None, None] * stride_xm
        x_low = tl.load(x_rows + col[None, :, :],
                        mask=mask_m[:, None, None] & (col < K)[None, :, :], other=0.0)
        x_high = tl.load(x_rows + col[None, :, :] + 32,
                         mask=mask_m[:, None, None] & (col + 32 < K)[None, :, :], other=0.0)
        per_block = tl.sum(x_low.to(tl.float32)[:, None, :, :] * low[None, :, :, :]
                           + x_high.to(tl.float32)[:, None, :, :] * high[None, :, :, :],
                           axis=3)  # [BM, BN, NB]
        acc += tl.sum(per_block * scale[None, :, :], axis=2)
    store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k,
               HAS_BIAS, SPLIT_K)


@triton.jit
def _nf4_gemm(x_ptr, qw_ptr, sc_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, Kp, stride_xm,
              stride_ym, M_BUCKET, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr,
              GROUP_M: tl.constexpr):
    """y = x @ W.T by tiles with `tl.dot`; the weight tile is dequantised in registers.

    The low and high nibbles of a byte run are two K-slices with their own activation
    columns, so each step is two dots. Programs are ordered in GROUP_M-row bands so that
    neighbours reuse the same weight tiles from L2. (M_BUCKET only keys the autotuner.)
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % rows_in_band)
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_band
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_bytes = Kp // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, row_bytes, BLOCK_BYTES):
        byte = b0 + tl.arange(0, BLOCK_BYTES)
        w_low, w_high = _half_tiles(qw_ptr, sc_ptr, lut_ptr, offs_n, byte, mask_n,
                                    row_bytes, Kp // 64, MODE)  # [BN, BB] each
        col_low, col_high = _half_columns(byte)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        x_low = tl.load(x_rows + col_low[None, :],
                        mask=mask_m[:, None] & (col_low[None, :] < K), other=0.0)
        x_high = tl.load(x_rows + col_high[None, :],
                         mask=mask_m[:, None] & (col_high[None, :] < K), other=0.0)
        acc = tl.dot(x_low, tl.trans(w_low.to(x_low.dtype)), acc)
        acc = tl.dot(x_high, tl.trans(w_high.to(x_high.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nf4_dequantise(qw_ptr, sc_ptr, lut_ptr, out_ptr, N, Kp, MODE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """out [N, Kp] = the weights, in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    mask_n = offs_n < N
    row_bytes = Kp // 2
    low, high = _half_tiles(qw_ptr, sc_ptr, lut_ptr, offs_n, byte, mask_n, row_bytes,
                            Kp // 64, MODE)
    col_low, col_high = _half_columns(byte)
    mask = mask_n[:, None] & (byte[None, :] < row_bytes)
    rows = out_ptr + offs_n[:, None] * Kp
    tl.store(rows + col_low[None, :], low.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rows + col_high[None, :], high.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_configs() -> list[triton.Config]:
    small = [(16, bn, bb, 4, 4) for bn in (32, 64, 128) for bb in (32, 64)]
    large = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
             (128, 128, 64, 8, 3), (128, 256, 32, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_BYTES": bb, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bb, w, s in small + large]


def _rows_match(configs: list[triton.Config], named_args: dict, **kwargs: object,
                ) -> list[triton.Config]:
    """16-row tiles for up to 16 rows, bigger ones above."""
    small = named_args["M_BUCKET"] <= GEMV_MAX_ROWS
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]


# On CUDA the tile sizes are tuned per shape on first use (a second or two per new shape);
# the interpreter, which runs every program in NumPy, gets interpreter_tile()'s.
_gemv_tuned = triton.autotune(gemv_configs("BLOCKS"), key=["BLOCK_M", "N", "K", "MODE"],
                              prune_configs_by={"early_config_prune": fits_registers("BLOCKS")},
                              reset_to_zero=["y_ptr"], do_bench=tuning_bench)(_nf4_gemv)
_gemm_tuned = triton.autotune(_gemm_configs(), key=["M_BUCKET", "N", "K", "MODE"],
                              prune_configs_by={"early_config_prune": _rows_match},
                              do_bench=tuning_bench)(_nf4_gemm)


def _gemv(x2: Tensor, w: NF4Weight, lut: Tensor, mode: int) -> Tensor:
    m, n = x2.shape[0], w.shape[0]
    y = torch.zeros((m, n), dtype=torch.float32, device=x2.device)  # split K adds into it
    bias = w.bias if w.bias is not None else y  # unused pointer when HAS_BIAS is False
    args = (x2, w.qweight, w.scales, lut, bias, y, m, n, w.shape[1], w.padded_k // 2,
            w.padded_k // 64, x2.stride(0), y.stride(0))
    meta = dict(HAS_BIAS=w.bias is not None, MODE=mode, BLOCK_M=triton.next_power_of_2(m))
    launch(_nf4_gemv, _gemv_tuned, "BLOCKS", args, meta, m, n, w.padded_k // 64)
    return y.to(x2.dtype)


def _gemm(x2: Tensor, w: NF4Weight, lut: Tensor, mode: int) -> Tensor:
    m, n = x2.shape[0], w.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    bias = w.bias if w.bias is not None else y
    args = (x2, w.qweight, w.scales, lut, bias, y, m, n, w.shape[1], w.padded_k,
            x2.stride(0), y.stride(0), triton.next_power_of_2(m))
    meta = dict(HAS_BIAS=w.bias is not None, MODE=mode)
    if interpreting():
        fixed = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
        _nf4_gemm[fixed](*args, **meta, BLOCK_M=16, BLOCK_N=32, BLOCK_BYTES=32, GROUP_M=2)
    else:
        def grid(cfg: dict) -> tuple[int]:
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

        _gemm_tuned[grid](*args, **meta)
    return y


def dequantise(w: NF4Weight, lut: Tensor, dtype: torch.dtype, codebook: str) -> Tensor:
    """The dense weight [N, K] in `dtype`, made on the device by one kernel."""
    n, k = w.shape
    out = torch.empty((n, w.padded_k), dtype=dtype, device=w.qweight.device)
    block_n, block_bytes = (16, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(w.padded_k // 2, block_bytes))
    _nf4_dequantise[grid](w.qweight, w.scales, lut, out, n, w.padded_k,
                          MODE=CODEBOOK_MODES[codebook],
                          BLOCK_N=block_n, BLOCK_BYTES=block_bytes)
    return out[:, :k]


def triton_linear(x: Tensor, w: NF4Weight, lut: Tensor, strategy: Strategy = Strategy(),
                  ) -> Tensor:
    """x [..., K] @ dequant(W).T + bias, W [N, K]; output in x's dtype.

    `lut` is `codebook_table(strategy.codebook, ...)` on x's device.
    """
    n, k = w.shape
    mode = CODEBOOK_MODES[strategy.codebook]
    if x.shape[-1] != k:
        raise ConfigError(f"input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    if m == 0:
        y = torch.empty((0, n), dtype=x.dtype, device=x.device)
    elif m <= GEMV_MAX_ROWS and (m == 1 or strategy.decode == "gemv"):
        y = _gemv(x2, w, lut, mode)
    elif (m <= GEMV_MAX_ROWS and strategy.decode == "dot") or (
            m > GEMV_MAX_ROWS and strategy.prefill == "fused"):
        y = _gemm(x2, w, lut, mode)
    else:
        dtype = matmul_dtype(x2)
        bias = None if w.bias is None else w.bias.to(dtype)
        y = F.linear(x2.to(dtype), dequantise(w, lut, dtype, strategy.codebook),
                     bias).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def triton_swiglu(x: Tensor, w: NF4Weight, lut: Tensor, strategy: Strategy = Strategy(),
                  ) -> Tensor:
    gate, up = triton_linear(x, w, lut, strategy).chunk(2, dim=-1)  # [..., F] each
    return F.silu(gate) * up
