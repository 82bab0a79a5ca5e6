"""Triton's interpreter (TRITON_INTERPRET=1): the kernels on CPU tensors, for tests.

The flag is read when a kernel is decorated, i.e. when its module is first imported, so a
test sets it before importing any of them.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_tile(m: int, n: int, groups: int) -> tuple[int, int, int]:
    """(BLOCK_N, groups per step, SPLIT_K) of a GEMV under the interpreter, which runs each
    program in NumPy: few big programs are what make a whole model affordable there, while
    ragged edges, several steps and split-K (two slices) are still run where K is long."""
    block_n = min(triton.next_power_of_2(n), max(16, 2048 // triton.next_power_of_2(m)))
    per = min(triton.next_power_of_2(groups), 4)
    return block_n, per, 2 if groups > 2 * per else 1
