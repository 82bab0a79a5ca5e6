"""Attention for new tokens on the GPU, each token a row with its own cache slot and
position, in two Triton launches per layer:

1. RoPE on the row's k heads, then its k and v into the float16 cache at
   [layer, slot, head, position];
2. per (row, query head): RoPE on q, then softmax(q.K / sqrt(D)) V over positions
   0..position of the slot, online (one pass over the keys, running max and sum).

Every row's keys are written before any row reads, so rows of one slot at consecutive
positions (a prompt chunk) are causal by position, as the CPU kernel (csrc/attention.h)
is. Slots and positions are read from device tensors and a row with a negative position
does nothing, which is what lets a decode step be captured once in a CUDA graph per batch
size and replayed with padding rows (cuda_graphs.py): no host value shapes the launch.

Same interface as the CPU kernel: qkv [R, (H + 2 Hkv) D] (any leading shape), caches
[L, S, Hkv, T, D], slots and positions int [R], cos/sin [context, D / 2]; returns
[R, H D] in qkv's dtype. The maths is float32; the rotate-half RoPE layout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from agent.decoder.kernels.interpreter import interpreting


@triton.jit
def _rotate(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _write_kv(qkv_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr, stride_row,
              cs_slot, cs_head, cs_pos, layer_off, k_col0, v_col0, HALF,
              BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + row)
    if pos >= 0:
        slot = tl.load(slot_ptr + row)
        i = tl.arange(0, BLOCK_H)
        m = i < HALF
        d = 2 * HALF
        src = qkv_ptr + row * stride_row
        k1 = tl.load(src + k_col0 + head * d + i, mask=m, other=0.0).to(tl.float32)
        k2 = tl.load(src + k_col0 + head * d + HALF + i, mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos * HALF + i, mask=m, other=0.0)
        s = tl.load(sin_ptr + pos * HALF + i, mask=m, other=0.0)
        r1, r2 = _rotate(k1, k2, c, s)
        dst = layer_off + slot * cs_slot + head * cs_head + pos * cs_pos
        tl.store(k_ptr + dst + i, r1.to(k_ptr.dtype.element_ty), mask=m)
        tl.store(k_ptr + dst + HALF + i, r2.to(k_ptr.dtype.element_ty), mask=m)
        v1 = tl.load(src + v_col0 + head * d + i, mask=m, other=0.0)
        v2 = tl.load(src + v_col0 + head * d + HALF + i, mask=m, other=0.0)
        tl.store(v_ptr + dst + i, v1.to(v_ptr.dtype.element_ty), mask=m)
        tl.store(v_ptr + dst + HALF + i, v2.to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def _attend(qkv_ptr, k_ptr, v_ptr, y_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr, stride_row,
            stride_y, cs_slot, cs_head, cs_pos, layer_off, GROUP, HALF, sm_scale,
            BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + row)
    i = tl.arange(0, BLOCK_H)
    m = i < HALF
    d = 2 * HALF
    out = y_ptr + row * stride_y + head * d
    if pos < 0:  # a padding row of a captured batch: defined output, no reads
        tl.store(out + i, tl.zeros((BLOCK_H,), tl.float32).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(out + HALF + i, tl.zeros((BLOCK_H,), tl.float32).to(y_ptr.dtype.element_ty),
                 mask=m)
    else:
        slot = tl.load(slot_ptr + row)
        src = qkv_ptr + row * stride_row + head * d
        q1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        q2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos * HALF + i, mask=m, other=0.0)
        s = tl.load(sin_ptr + pos * HALF + i, mask=m, other=0.0)
        q1, q2 = _rotate(q1, q2, c, s)
        q1 = q1 * sm_scale
        q2 = q2 * sm_scale
        base = layer_off + slot * cs_slot + (head // GROUP) * cs_head
        run_max = tl.full((1,), float("-inf"), tl.float32)
        run_sum = tl.zeros((1,), tl.float32)
        acc1 = tl.zeros((BLOCK_H,), tl.float32)
        acc2 = tl.zeros((BLOCK_H,), tl.float32)
        t = tl.arange(0, BLOCK_T)
        for t0 in range(0, pos + 1, BLOCK_T):
            tm = (t0 + t) <= pos
            at = base + (t0 + t)[:, None] * cs_pos + i[None, :]
            mk = tm[:, None] & m[None, :]
            k1 = tl.load(k_ptr + at, mask=mk, other=0.0).to(tl.float32)
            k2 = tl.load(k_ptr + at + HALF, mask=mk, other=0.0).to(tl.float32)
            score = tl.sum(k1 * q1[None, :] + k2 * q2[None, :], axis=1)  # [BT]
            score = tl.where(tm, score, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(score, axis=0))
            p = tl.exp(score - new_max)
            alpha = tl.exp(run_max - new_max)
            v1 = tl.load(v_ptr + at, mask=mk, other=0.0).to(tl.float32)
            v2 = tl.load(v_ptr + at + HALF, mask=mk, other=0.0).to(tl.float32)
            acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, axis=0)
            acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, axis=0)
            run_sum = run_sum * alpha + tl.sum(p, axis=0)
            run_max = new_max
        tl.store(out + i, (acc1 / run_sum).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(out + HALF + i, (acc2 / run_sum).to(y_ptr.dtype.element_ty), mask=m)


def _block_t() -> int:
    # The interpreter runs each program in NumPy: bigger chunks, fewer Python steps.
    return 256 if interpreting() else 64


def token_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int,
                    slots: Tensor, positions: Tensor, cos: Tensor, sin: Tensor,
                    n_head: int, n_kv_head: int) -> Tensor:
    """See the module docstring; rows with a negative position give zeros."""
    head_dim = k_cache.shape[-1]
    rows = slots.shape[0]
    qkv2 = qkv.reshape(rows, -1)
    if qkv2.stride(-1) != 1:
        qkv2 = qkv2.contiguous()
    half = head_dim // 2
    block_h = triton.next_power_of_2(half)
    cs = k_cache.stride()
    layer_off = layer * cs[0]
    _write_kv[(rows, n_kv_head)](
        qkv2, k_cache, v_cache, slots, positions, cos, sin, qkv2.stride(0), cs[1], cs[2],
        cs[3], layer_off, n_head * head_dim, (n_head + n_kv_head) * head_dim, half,
        BLOCK_H=block_h)
    y = torch.empty((rows, n_head * head_dim), dtype=qkv.dtype, device=qkv.device)
    _attend[(rows, n_head)](
        qkv2, k_cache, v_cache, y, slots, positions, cos, sin, qkv2.stride(0), y.stride(0),
        cs[1], cs[2], cs[3], layer_off, n_head // n_kv_head, half, 1.0 / math.sqrt(head_dim),
        BLOCK_H=block_h, BLOCK_T=_block_t())
    return y
