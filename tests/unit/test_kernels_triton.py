"""The Triton kernels (NF4, the GGUF's own blocks, the 8-bit head, token attention), run
on the CPU by Triton's interpreter (TRITON_INTERPRET=1) where there is no CUDA.

Shapes are small (the interpreter runs each program in numpy) but cover what the CUDA
kernels must get right: 1-16 rows (GEMV) and more (GEMM), ragged N and K, block edges,
bias, fused SwiGLU. In the interpreter both kernels compute in float32, so they must
equal the reference up to float32 summation order: |err| <= 1e-5 * sum|w x| + 1e-6.
"""

from __future__ import annotations

import pytest
import torch

# Triton is in the test extra, so CI always runs these; a plain install without it (a CPU
# user) has no Triton kernels to check.
pytest.importorskip("triton")

from gguf import GGMLQuantizationType as Q

from agent.decoder import native, nf4, q8
from agent.decoder.kernels.reference import reference_swiglu
from agent.decoder.kernels.triton_affine import affine_dequantise
from agent.decoder.kernels.triton_attention import token_attention
from agent.decoder.kernels.triton_backend import TritonBackend
from agent.decoder.kernels.triton_nf4 import Strategy, codebook_table, dequantise
from tests.decoder_fixtures import TRITON_DEVICE, random_blocks


@pytest.fixture(scope="module")
def triton_backend() -> TritonBackend:
    return TritonBackend(TRITON_DEVICE)


def check(backend: TritonBackend, x: torch.Tensor, w: nf4.NF4Weight) -> None:
    check_against(backend, x, w, nf4.dequantise(w))


def check_against(backend: TritonBackend, x: torch.Tensor, w, dense: torch.Tensor) -> None:
    """The kernel's x @ W.T (+ b) equals the float32 product with the dense weights up to
    float32 summation order; on CUDA the dequantise + cuBLAS path multiplies float32
    activations in float16 (interpreter.matmul_dtype), which rounds each factor to 11
    bits."""
    got = backend.linear(x.to(backend.device), w).cpu()
    want = x @ dense.T + (0 if w.bias is None else w.bias)
    assert got.shape == want.shape and got.dtype == x.dtype
    scale = x.reshape(-1, w.shape[1]).abs() @ dense.abs().T  # [M, N]
    err = (got - want).abs().reshape(-1, w.shape[0])
    rel = 2e-3 if backend.device.type == "cuda" else 1e-5
    assert bool((err <= rel * scale + 1e-6).all()), float(err.max())


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
    got = triton_backend.swiglu(x.to(triton_backend.device), w).cpu()
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, reference_swiglu(x, w), rtol=1e-4, atol=1e-5)


def test_bind_and_empty_batch(triton_backend: TritonBackend) -> None:
    w = nf4.quantise(torch.randn(8, 64))
    x = torch.randn(2, 64, device=triton_backend.device)
    assert torch.equal(triton_backend.bind(w)(x), triton_backend.linear(x, w))
    assert triton_backend.linear(x[:0], w).shape == (0, 8)


@pytest.mark.parametrize("strategy", [
    Strategy(decode="dot", prefill="fused", codebook="select"),
    Strategy(decode="gemv", prefill="dequant", codebook="table"),
    Strategy(decode="dequant", prefill="fused", codebook="pairs"),
])
def test_every_strategy_matches_the_reference(strategy: Strategy) -> None:
    backend = TritonBackend(TRITON_DEVICE, strategy)
    torch.manual_seed(5)
    w = nf4.quantise(torch.randn(33, 100), torch.randn(33))
    for m in (1, 5, 16, 21):  # GEMV, 2-16 rows, the 16-row edge, prefill
        check(backend, torch.randn(m, 100), w)


@pytest.mark.parametrize("codebook", ["pairs", "select", "table"])
def test_dequantise_kernel_equals_the_reference(codebook: str) -> None:
    torch.manual_seed(6)
    w = nf4.quantise(torch.randn(19, 130))  # ragged rows and a padded last block
    backend = TritonBackend(TRITON_DEVICE)
    got = dequantise(backend.prepare(w), codebook_table(codebook, backend.device),
                     torch.float32, codebook)
    assert got.shape == (19, 130)
    assert torch.equal(got.cpu(), nf4.dequantise(w))


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q8_0,
                                   Q.Q6_K])
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_native_blocks_multiply_as_the_files_weights(triton_backend: TritonBackend,
                                                     qtype: Q, m: int) -> None:
    """Every GGUF block type the CPU reads raw: the GEMV (1-16 rows; the backend's choice
    for one) and the dequantiser with a matmul (the backend's for more), both against
    gguf-exact dense weights."""
    k = 512 if qtype in K_QUANTS else 160  # 160: a padded last 64-block
    w = native.from_blocks(random_blocks(qtype, 37, k, seed=m), qtype, (37, k))
    torch.manual_seed(m)
    x, dense = torch.randn(m, k), native.dequantise(w)
    check_against(triton_backend, x, w, dense)
    if m <= 16:
        check_against(TritonBackend(TRITON_DEVICE, affine_gemv_rows=16), x, w, dense)


def test_fused_native_parts_with_bias_and_swiglu(triton_backend: TritonBackend) -> None:
    """A Qwen-style wqkv (Q8_0 rows next to Q4_1 ones: one i8 layout with offsets) and a
    gate/up pair, as the model fuses them."""
    parts = [native.from_blocks(random_blocks(t, n, 192, seed=i), t, (n, 192))
             for i, (t, n) in enumerate([(Q.Q8_0, 24), (Q.Q4_1, 8), (Q.Q4_1, 8)])]
    w = native.concat_rows(parts)
    w.bias = torch.randn(40)
    dense = native.dequantise(w)
    for m in (1, 5, 33):
        check_against(triton_backend, torch.randn(m, 192), w, dense)
    x = torch.randn(2, 192)
    got = triton_backend.swiglu(x.to(triton_backend.device), w).cpu()
    gate, up = (x @ dense.T + w.bias).chunk(2, dim=-1)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m", [1, 7, 24])
def test_eight_bit_head(triton_backend: TritonBackend, m: int) -> None:
    torch.manual_seed(m)
    w = q8.quantise(torch.randn(300, 100), torch.randn(300))
    check_against(triton_backend, torch.randn(m, 100), w, q8.dequantise(w))
    dense = affine_dequantise(triton_backend.prepare(w), torch.float32).cpu()
    assert torch.equal(dense, q8.dequantise(w))


def _rope_tables(ctx: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(ctx, dtype=torch.float64),
                         1 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return angles.cos().float(), angles.sin().float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_token_attention_writes_the_cache_then_attends_causally() -> None:
    """Rows of different slots, two consecutive positions of one slot (causal within the
    step), a padding row (position -1: no write, zeros out), head size 24 (not a power of
    two) and 4 query heads over 2 KV heads, against softmax attention written out."""
    torch.manual_seed(0)
    n_layer, n_slots, h, hkv, t_max, d = 2, 3, 4, 2, 300, 24
    k_cache = torch.randn(n_layer, n_slots, hkv, t_max, d).half()
    v_cache = torch.randn(n_layer, n_slots, hkv, t_max, d).half()
    want_k, want_v = k_cache.float(), v_cache.float()
    cos, sin = _rope_tables(t_max, d)
    slots = torch.tensor([2, 0, 0, 1])
    positions = torch.tensor([5, 270, 271, -1])  # 270 keys: more than one chunk of them
    qkv = torch.randn(4, (h + 2 * hkv) * d)
    dev = TRITON_DEVICE
    kc, vc = k_cache.to(dev), v_cache.to(dev)
    got = token_attention(qkv.to(dev), kc, vc, 1, slots.to(dev), positions.to(dev),
                          cos.to(dev), sin.to(dev), h, hkv).cpu()
    rows = [(r, int(p)) for r, p in enumerate(positions) if p >= 0]
    for r, p in rows:
        k = qkv[r, h * d:(h + hkv) * d].view(hkv, d)
        want_k[1, slots[r], :, p] = _rope(k, cos[p], sin[p]).half().float()
        want_v[1, slots[r], :, p] = qkv[r, (h + hkv) * d:].view(hkv, d).half().float()
    assert torch.equal(kc.cpu().float(), want_k) and torch.equal(vc.cpu().float(), want_v)
    for r, p in rows:
        q = _rope(qkv[r, :h * d].view(h, d), cos[p], sin[p])
        for head in range(h):
            keys = want_k[1, slots[r], head // 2, :p + 1]
            weights = torch.softmax(keys @ q[head] / d ** 0.5, dim=0)
            want = weights @ want_v[1, slots[r], head // 2, :p + 1]
            torch.testing.assert_close(got[r, head * d:(head + 1) * d], want,
                                       rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(h * d))
