"""NF4 format: round-trip error bound, packing order, double quantisation, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decoder import nf4
from agent.errors import ConfigError

# Float slack for the bound: the reference dequantisation multiplies in float32.
FLOAT_SLACK = 4 * torch.finfo(torch.float32).eps


def _check_bound(weight: torch.Tensor, w: nf4.NF4Weight) -> None:
    error = (weight - nf4.dequantise(w)).abs()
    bound = nf4.error_bound(weight, w)
    slack = FLOAT_SLACK * weight.abs().amax(dim=1, keepdim=True)
    assert bool((error <= bound + slack).all()), float((error - bound).max())


def test_codebook_is_qlora_nf4() -> None:
    assert nf4.CODEBOOK.shape == (16,)
    assert nf4.CODEBOOK[7] == 0.0 and nf4.CODEBOOK[0] == -1.0 and nf4.CODEBOOK[15] == 1.0
    assert bool((nf4.CODEBOOK[1:] > nf4.CODEBOOK[:-1]).all())
    assert math.isclose(nf4.MAX_HALF_GAP, (1.0 - 0.6961928009986877) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("scale_search", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(7, 64), (33, 576), (5, 100), (1, 1), (64, 1536)])
def test_round_trip_within_bound(shape: tuple[int, int], double_quant: bool,
                                 scale_search: bool) -> None:
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w = nf4.quantise(weight, double_quant=double_quant, scale_search=scale_search)
    assert w.shape == shape and w.padded_k % 64 == 0
    _check_bound(weight, w)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 200), scale=st.floats(1e-6, 1e3),
       seed=st.integers(0, 2**16), double_quant=st.booleans(), scale_search=st.booleans())
def test_round_trip_bound_property(n: int, k: int, scale: float, seed: int,
                                   double_quant: bool, scale_search: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * scale
    weight[0, : k // 3] = 0.0  # all-zero and partly-zero blocks
    _check_bound(weight, nf4.quantise(weight, double_quant=double_quant,
                                      scale_search=scale_search))


def test_scale_search_lowers_the_error() -> None:
    """Searched scales never lose to absmax in any block, and win in total."""
    torch.manual_seed(8)
    weight = torch.distributions.StudentT(3.0).sample((64, 512))
    plain = (nf4.dequantise(nf4.quantise(weight)) - weight).pow(2).reshape(64, -1, 64).sum(2)
    searched = nf4.dequantise(nf4.quantise(weight, scale_search=True))
    searched_err = (searched - weight).pow(2).reshape(64, -1, 64).sum(2)
    assert bool((searched_err <= plain * (1 + 1e-3) + 1e-9).all())
    assert float(searched_err.sum()) < float(plain.sum())


def test_bound_with_float16_scales_is_half_gap_of_absmax() -> None:
    """For normal-range float16 scales the bound reduces to H * absmax * (1 + 2**-11)."""
    torch.manual_seed(1)
    weight = torch.randn(16, 256)
    w = nf4.quantise(weight)
    absmax = weight.reshape(16, -1, 64).abs().amax(dim=2, keepdim=True)
    error = (weight - nf4.dequantise(w)).abs().reshape(16, -1, 64)
    limit = nf4.MAX_HALF_GAP * absmax * (1 + 2**-11) + FLOAT_SLACK * absmax
    assert bool((error <= limit).all())


def test_codebook_values_are_exact() -> None:
    """Weights that are codebook multiples of their absmax come back exactly."""
    codes = torch.arange(64) % 16
    codes[0] = 15  # absmax = 1.0 * scale
    weight = (nf4.CODEBOOK[codes] * 0.5)[None, :]
    assert torch.equal(nf4.dequantise(nf4.quantise(weight)), weight)


def test_packing_is_split_halves() -> None:
    """Byte j of a block: weight j in the low nibble, weight j + 32 in the high nibble."""
    codes = torch.arange(64) % 16
    codes[5] = 15
    weight = nf4.CODEBOOK[codes][None, :]
    w = nf4.quantise(weight)
    packed = w.qweight[0]
    assert packed.shape == (32,)
    for j in range(32):
        assert int(packed[j]) & 0x0F == int(codes[j])
        assert int(packed[j]) >> 4 == int(codes[j + 32])


def test_padding_and_zero_rows() -> None:
    weight = torch.zeros(3, 70)
    weight[1, 69] = 2.0
    w = nf4.quantise(weight)
    assert w.qweight.shape == (3, 64) and w.scales.shape == (3, 2)
    assert torch.equal(nf4.dequantise(w), weight)
    assert w.padded_k == 128 and w.shape == (3, 70)


def test_double_quant_scales_are_bytes() -> None:
    torch.manual_seed(2)
    weight = torch.randn(40, 1024)
    w = nf4.quantise(weight, double_quant=True)
    assert w.double_quantised and w.scales.dtype == torch.uint8
    assert w.scale_offset is not None and w.scale_offset.numel() == math.ceil(40 * 16 / 256)
    plain = nf4.quantise(weight)
    assert w.nbytes() < plain.nbytes()
    # 8-bit scales cost little accuracy against float16 ones.
    err_dq = (nf4.dequantise(w) - weight).pow(2).mean()
    err_fp16 = (nf4.dequantise(plain) - weight).pow(2).mean()
    assert float(err_dq) < 1.05 * float(err_fp16)


def test_bias_is_kept() -> None:
    bias = torch.randn(4)
    w = nf4.quantise(torch.randn(4, 64), bias)
    assert w.bias is not None and torch.equal(w.bias, bias)


def test_bad_input_raises_typed_errors() -> None:
    with pytest.raises(ConfigError):
        nf4.quantise(torch.randn(4))
    with pytest.raises(ConfigError):
        nf4.quantise(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ConfigError):
        nf4.quantise(torch.tensor([[1e6, 1.0]]))  # beyond float16 scales


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    weights = {"a": nf4.quantise(torch.randn(8, 128), torch.randn(8)),
               "b": nf4.quantise(torch.randn(3, 64), double_quant=True)}
    path = tmp_path / "w.pt"
    nf4.save(path, weights, meta={"gguf": "x"})
    loaded = nf4.load(path, meta={"gguf": "x"})
    assert loaded is not None
    got, _ = loaded
    for name, w in weights.items():
        assert got[name].shape == w.shape
        assert torch.equal(nf4.dequantise(got[name]), nf4.dequantise(w))
    assert nf4.load(path, meta={"gguf": "other"}) is None
    assert nf4.load(tmp_path / "missing.pt") is None
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert nf4.load(tmp_path / "junk.pt") is None
