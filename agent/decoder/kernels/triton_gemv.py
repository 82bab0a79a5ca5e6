"""What the GEMV kernels of every weight format share: the tiles they are tuned over, how
a candidate tile is timed, and how a program's partial sums reach the output.

A GEMV program owns BLOCK_N outputs and a slice of K (SPLIT_K slices meet by atomic adds
into a zeroed float32 output), and walks its slice a step of PER quant groups at a time,
multiplying a [BLOCK_M, BLOCK_N, PER, 32] broadcast product: what `fits_registers` bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import triton
import triton.language as tl

from agent.decoder.kernels.interpreter import interpreter_tile, interpreting

GEMV_MAX_ROWS = 16  # the most activation rows a GEMV takes
# (BLOCK_N, groups per step, warps); each with SPLIT_K 1 and 4.
TILES = ((4, 4, 2), (8, 4, 4), (16, 2, 4), (16, 4, 8), (32, 2, 8), (4, 1, 1), (16, 1, 4),
         (4, 8, 2), (16, 8, 8))


def gemv_configs(per_key: str) -> list[triton.Config]:
    """Candidate tiles, the groups-per-step parameter named `per_key`."""
    return [triton.Config({"BLOCK_N": bn, per_key: per, "SPLIT_K": sk}, num_warps=w)
            for bn, per, w in TILES for sk in (1, 4)]


def _fits(per_key: str, configs: list[triton.Config], named_args: dict,
          **kwargs: object) -> list[triton.Config]:
    rows = kwargs["BLOCK_M"]
    fit = [c for c in configs if rows * c.kwargs["BLOCK_N"] * c.kwargs[per_key] <= 256]
    return fit or configs[:1]


def fits_registers(per_key: str) -> Callable[..., list[triton.Config]]:
    """A pruner keeping tiles whose broadcast product stays <= 8K values per program."""
    return partial(_fits, per_key)


def tuning_bench(fn: Callable[[], object], quantiles: tuple[float, ...]) -> list[float]:
    """A short timing per candidate tile: enough to rank them, cheap on first use."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def launch(kernel: Any, tuned: Any, per_key: str, args: tuple[Any, ...],
           meta: dict[str, Any], m: int, n: int, groups: int) -> None:
    """Run a GEMV: under the interpreter with its few big tiles (interpreter_tile), on
    CUDA through the autotuned kernel, on a grid of (N tiles, K slices)."""
    if interpreting():
        bn, per, split = interpreter_tile(m, n, groups)
        kernel[(triton.cdiv(n, bn), split)](*args, **meta, BLOCK_N=bn, SPLIT_K=split,
                                            **{per_key: per})
        return

    def grid(cfg: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"]

    tuned[grid](*args, **meta)


@triton.jit
def program_slice(M, N, n_groups, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PER: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's outputs and K slice: (its K-slice index, output columns, rows, their
    masks, and the first and one-past-last quant group of its slice)."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    per_slice = tl.cdiv(tl.cdiv(n_groups, SPLIT_K), PER) * PER
    first = pid_k * per_slice
    last = tl.minimum(first + per_slice, n_groups)
    return pid_k, offs_n, offs_m, offs_n < N, offs_m < M, first, last


@triton.jit
def store_rows(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] (+ bias, added by the first K slice) into y: stored, or
    added atomically where several K slices meet."""
    if HAS_BIAS:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_y)
