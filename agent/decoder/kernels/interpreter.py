"""What the Triton kernels' host code decides from where it runs: Triton's interpreter
(TRITON_INTERPRET=1, the kernels on CPU tensors, for tests) or CUDA.

The flag is read when a kernel is decorated, i.e. when its module is first imported, so a
test sets it before importing any of them.
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_tile(m: int, n: int, groups: int) -> tuple[int, int, int]:
    """(BLOCK_N, groups per step, SPLIT_K) of a GEMV under the interpreter, which runs each
    program in NumPy: few big programs are what make a whole model affordable there, while
    ragged edges, several steps and split-K (two slices) are still run where K is long."""
    block_n = min(triton.next_power_of_2(n), max(16, 2048 // triton.next_power_of_2(m)))
    per = min(triton.next_power_of_2(groups), 4)
    return block_n, per, 2 if groups > 2 * per else 1


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a dequantise-then-cuBLAS product takes its operands in: float32
    activations on CUDA go as float16 (with float32 accumulation), since a float32 GEMM
    runs at a tenth of the tensor cores' float16 rate; anything else as it is (the
    interpreter stays exact in float32)."""
    return torch.float16 if x.is_cuda and x.dtype == torch.float32 else x.dtype
