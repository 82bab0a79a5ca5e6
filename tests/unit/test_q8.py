"""8-bit weights (the output head's format): rounding bound, storage, the CPU kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agent.decoder import nf4, q8
from agent.decoder.kernels import get_backend
from agent.decoder.kernels.reference import reference_linear
from agent.errors import ConfigError


def test_rounding_stays_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(40, 150) * 0.1  # 150: a padded last block
    w = q8.quantise(weight)
    assert w.qweight.dtype == torch.int8 and w.qweight.shape == (40, 192)
    assert int(w.qweight.min()) >= -127  # -128 would break the kernel's |w| trick
    step = w.scales.float().repeat_interleave(64, dim=1)[:, :150]
    err = (q8.dequantise(w) - weight).abs()
    assert bool((err <= step / 2 * (1 + 2**-10) + 1e-7).all())
    assert torch.equal(w.qweight[:, 150:], torch.zeros(40, 42, dtype=torch.int8))


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ConfigError):
        q8.quantise(torch.zeros(3))
    with pytest.raises(ConfigError):
        q8.quantise(torch.tensor([[1.0, float("nan")]]))


def test_saved_beside_nf4_weights(tmp_path) -> None:
    torch.manual_seed(1)
    weights = {"head": q8.quantise(torch.randn(9, 64), torch.randn(9)),
               "body": nf4.quantise(torch.randn(5, 64))}
    path = tmp_path / "w.pt"
    nf4.save(path, weights)
    loaded, _ = nf4.load(path)
    assert isinstance(loaded["head"], q8.Q8Weight)
    assert isinstance(loaded["body"], nf4.NF4Weight)
    for name, w in weights.items():
        for key, tensor in w.tensors().items():
            assert torch.equal(loaded[name].tensors()[key], tensor)


@pytest.mark.parametrize("m,n,k", [(1, 300, 576), (3, 70, 100), (5, 33, 64), (9, 20, 130)])
def test_cpu_kernel_within_its_activation_rounding(settings, m: int, n: int, k: int) -> None:
    """The kernel rounds activations per 64-block to multiples of xs = absmax / 127, so
    |y - y_ref| <= sum_b xs_b / 2 * sum_k |w_k| (plus float32 slack)."""
    cpu = get_backend("cpu", settings.cache_dir)
    if not getattr(cpu, "native", False):
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    torch.manual_seed(m + n + k)
    w = q8.quantise(torch.randn(n, k) * 0.05, torch.randn(n))
    x = torch.randn(m, k) * 2
    got, want = cpu.linear(x, w), reference_linear(x, w)
    blocks = F.pad(x, (0, w.padded_k - k)).reshape(m, -1, 64)
    xs = blocks.abs().amax(dim=2) / 127  # [M, B]
    dense = q8.dequantise(w).abs()
    per_block = F.pad(dense, (0, w.padded_k - k)).reshape(n, -1, 64).sum(dim=2)  # [N, B]
    bound = (xs / 2) @ per_block.T + 1e-5 * (x.abs() @ dense.T) + 1e-5
    assert bool(((got - want).abs() <= bound).all())
