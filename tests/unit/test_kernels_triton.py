"""The Triton NF4 kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Shapes are small (the interpreter runs each program in numpy) but cover what the CUDA
kernels must get right: 1-16 rows (GEMV) and more (GEMM), ragged N and K, block edges,
bias, fused SwiGLU. In the interpreter both kernels compute in float32, so they must
equal the reference up to float32 summation order: |err| <= 1e-5 * sum|w x| + 1e-6.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. imported
# Triton is in the test extra, so CI always runs these; a plain install without it (a CPU
# user) has no Triton kernels to check.
pytest.importorskip("triton")

from agent.decoder import nf4
from agent.decoder.kernels.reference import reference_linear, reference_swiglu

if "agent.decoder.kernels.triton_nf4" in sys.modules:  # imported before without the flag
    importlib.reload(sys.modules["agent.decoder.kernels.triton_nf4"])
from agent.decoder.kernels.triton_nf4 import (
    Strategy,
    TritonBackend,
    codebook_table,
    dequantise,
)


@pytest.fixture(scope="module")
def triton_backend() -> TritonBackend:
    return TritonBackend("cpu")


def check(backend: TritonBackend, x: torch.Tensor, w: nf4.NF4Weight) -> None:
    got = backend.linear(x, w)
    want = reference_linear(x, w)
    assert got.shape == want.shape and got.dtype == x.dtype
    scale = x.reshape(-1, w.shape[1]).abs() @ nf4.dequantise(w).abs().T  # [M, N]
    err = (got - want).abs().reshape(-1, w.shape[0])
    assert bool((err <= 1e-5 * scale + 1e-6).all()), float(err.max())


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("n,k", [(1, 64), (31, 128), (33, 192), (70, 64)])
def test_gemv_rows(triton_backend: TritonBackend, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 100 + n + k)
    check(triton_backend, torch.randn(m, k), nf4.quantise(torch.randn(n, k)))


@pytest.mark.parametrize("m,n,k", [(17, 33, 64), (40, 65, 128), (70, 32, 192)])
def test_gemm_rows(triton_backend: TritonBackend, m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + k)
    check(triton_backend, torch.randn(m, k), nf4.quantise(torch.randn(n, k)))


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("k", [1, 63, 65, 100])
def test_ragged_in_features(triton_backend: TritonBackend, m: int, k: int) -> None:
    torch.manual_seed(k + m)
    check(triton_backend, torch.randn(m, k), nf4.quantise(torch.randn(9, k)))


def test_bias_batch_dims_and_double_quant(triton_backend: TritonBackend) -> None:
    torch.manual_seed(3)
    w = nf4.quantise(torch.randn(40, 128), torch.randn(40), double_quant=True)
    check(triton_backend, torch.randn(2, 3, 128), w)
    check(triton_backend, torch.randn(2, 12, 128), w)  # 24 rows: the GEMM path


def test_swiglu(triton_backend: TritonBackend) -> None:
    torch.manual_seed(4)
    w = nf4.quantise(torch.randn(64, 128) * 0.1)
    x = torch.randn(3, 128)
    got = triton_backend.swiglu(x, w)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, reference_swiglu(x, w), rtol=1e-4, atol=1e-5)


def test_bind_and_empty_batch(triton_backend: TritonBackend) -> None:
    w = nf4.quantise(torch.randn(8, 64))
    x = torch.randn(2, 64)
    assert torch.equal(triton_backend.bind(w)(x), triton_backend.linear(x, w))
    assert triton_backend.linear(torch.zeros(0, 64), w).shape == (0, 8)


@pytest.mark.parametrize("strategy", [
    Strategy(decode="dot", prefill="fused", codebook="select"),
    Strategy(decode="gemv", prefill="dequant", codebook="table"),
    Strategy(decode="dequant", prefill="fused", codebook="pairs"),
])
def test_every_strategy_matches_the_reference(strategy: Strategy) -> None:
    backend = TritonBackend("cpu", strategy)
    torch.manual_seed(5)
    w = nf4.quantise(torch.randn(33, 100), torch.randn(33))
    for m in (1, 5, 16, 21):  # GEMV, 2-16 rows, the 16-row edge, prefill
        check(backend, torch.randn(m, 100), w)


@pytest.mark.parametrize("codebook", ["pairs", "select", "table"])
def test_dequantise_kernel_equals_the_reference(codebook: str) -> None:
    torch.manual_seed(6)
    w = nf4.quantise(torch.randn(19, 130))  # ragged rows and a padded last block
    got = dequantise(TritonBackend("cpu").prepare(w), codebook_table(codebook, "cpu"),
                     torch.float32, codebook)
    assert got.shape == (19, 130)
    assert torch.equal(got, nf4.dequantise(w))
