"""The CPU backend against the reference, within the bound its int8 arithmetic implies.

The compiled kernel differs from the float32 reference in two stated ways (see
kernels/cpu.py): activations are rounded per 64-block to multiples of xs = absmax / 127,
and the codebook is used as round(63 c) / 63. For one output,

    |y - y_ref| <= sum_b s_b * ( 0.5/63 * sum_k |x_k| + xs_b / 2 * sum_k |c'_k| )

plus float32 accumulation slack (1e-5 of sum |w x|). The tests assert exactly that.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from agent.decoder import nf4
from agent.decoder.kernels import get_backend
from agent.decoder.kernels.cpu import CpuBackend, build_dir, build_lock_path
from agent.decoder.kernels.reference import reference_linear, reference_swiglu


@pytest.fixture(scope="module")
def cpu(settings) -> CpuBackend:
    backend = get_backend("cpu", settings.cache_dir)
    assert isinstance(backend, CpuBackend)
    if not backend.native:
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    return backend


def int8_bound(x: torch.Tensor, w: nf4.NF4Weight) -> torch.Tensor:
    """Per-output bound [M, N] on |cpu - reference| (module docstring)."""
    n, k = w.shape
    kp = w.padded_k
    x = F.pad(x.reshape(-1, k).float(), (0, kp - k)).reshape(-1, kp // 64, 64)  # [M, B, 64]
    scales = w.block_scales()  # [N, B]
    codes = nf4.CODEBOOK[nf4.unpack_codes(w.qweight).long()]  # [N, Kp]
    c7 = torch.round(codes * 63) / 63
    abs_x = x.abs().sum(dim=2)  # [M, B]
    xs = x.abs().amax(dim=2) / 127  # [M, B]
    abs_c = c7.abs().reshape(n, -1, 64).sum(dim=2)  # [N, B]
    weight_part = (0.5 / 63) * abs_x @ scales.T  # [M, N]
    act_part = (xs / 2) @ (scales * abs_c).T
    dense = nf4.dequantise(w).abs()
    slack = 1e-5 * (x.reshape(x.shape[0], -1)[:, :k].abs() @ dense.T) + 1e-6
    return weight_part + act_part + slack


def check(cpu: CpuBackend, x: torch.Tensor, w: nf4.NF4Weight) -> None:
    got = cpu.linear(x, w)
    want = reference_linear(x, w)
    assert got.shape == want.shape and got.dtype == x.dtype
    err = (got - want).abs().reshape(-1, w.shape[0])
    bound = int8_bound(x, w)
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("n,k", [(1, 64), (7, 128), (33, 576), (100, 192), (960, 576)])
def test_decode_rows_match_reference(cpu: CpuBackend, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 1000 + n + k)
    w = nf4.quantise(torch.randn(n, k) * 0.05)
    check(cpu, torch.randn(m, k), w)


@pytest.mark.parametrize("m,n,k", [(67, 96, 256), (300, 40, 1536), (129, 17, 64)])
def test_prefill_rows_match_reference(cpu: CpuBackend, m: int, n: int, k: int) -> None:
    torch.manual_seed(m + n + k)
    w = nf4.quantise(torch.randn(n, k))
    check(cpu, torch.randn(m, k) * 3, w)


@pytest.mark.parametrize("k", [1, 63, 65, 100])
def test_ragged_in_features_are_padded(cpu: CpuBackend, k: int) -> None:
    torch.manual_seed(k)
    w = nf4.quantise(torch.randn(12, k))
    check(cpu, torch.randn(3, k), w)


def test_bias_outliers_and_batch_dims(cpu: CpuBackend) -> None:
    torch.manual_seed(5)
    weight = torch.randn(50, 320)
    weight[3, 17] = 40.0  # an outlier block
    w = nf4.quantise(weight, torch.randn(50))
    x = torch.randn(2, 3, 320)
    x[0, 1, 5] = 200.0  # an outlier activation
    check(cpu, x, w)
    assert cpu.linear(x, w).shape == (2, 3, 50)


def test_zero_input_and_empty_batch(cpu: CpuBackend) -> None:
    w = nf4.quantise(torch.randn(8, 128), torch.arange(8.0))
    assert torch.equal(cpu.linear(torch.zeros(2, 128), w), torch.arange(8.0).expand(2, 8))
    assert cpu.linear(torch.zeros(0, 128), w).shape == (0, 8)


def test_double_quantised_weights(cpu: CpuBackend) -> None:
    torch.manual_seed(6)
    w = nf4.quantise(torch.randn(70, 512), double_quant=True)
    check(cpu, torch.randn(4, 512), w)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_swiglu_fused_matches_reference(cpu: CpuBackend, m: int) -> None:
    torch.manual_seed(m)
    ffn = 96
    w = nf4.quantise(torch.randn(2 * ffn, 192) * 0.1, torch.randn(2 * ffn) * 0.1)
    x = torch.randn(m, 192)
    got = cpu.swiglu(x, w)
    want = reference_swiglu(x, w)
    assert got.shape == (m, ffn)
    # Through silu(g) * u: |d(silu(g) u)| <= |silu'(g)| |u| dg + |silu(g)| du, silu' <= 1.1.
    bound = int8_bound(x, w)
    gate, up = reference_linear(x, w).chunk(2, dim=-1)
    limit = 1.1 * (up.abs() + bound[:, ffn:]) * bound[:, :ffn] + \
        F.silu(gate).abs() * bound[:, ffn:] + 1.1 * bound[:, :ffn] * bound[:, ffn:]
    assert bool(((got - want).abs() <= limit + 1e-6).all())


def test_bfloat16_activations(cpu: CpuBackend) -> None:
    torch.manual_seed(7)
    w = nf4.quantise(torch.randn(64, 256))
    x = torch.randn(3, 256).to(torch.bfloat16)
    got = cpu.linear(x, w)
    assert got.dtype == torch.bfloat16
    want = reference_linear(x.float(), w)
    bound = int8_bound(x.float(), w) + want.abs() * 2**-8  # plus the bf16 output rounding
    assert bool(((got.float() - want).abs() <= bound).all())


def test_bind_equals_linear(cpu: CpuBackend) -> None:
    w = nf4.quantise(torch.randn(40, 128))
    x = torch.randn(2, 128)
    assert torch.equal(cpu.bind(w)(x), cpu.linear(x, w))


def test_fallback_without_compiler_is_the_reference(settings) -> None:
    fallback = CpuBackend(settings.cache_dir, native=False)
    assert not fallback.native
    w = nf4.quantise(torch.randn(9, 100), torch.randn(9))
    x = torch.randn(4, 100)
    assert torch.equal(fallback.linear(x, w), reference_linear(x, w))
    assert torch.equal(fallback.bind(w)(x), reference_linear(x, w))
    w2 = nf4.quantise(torch.randn(10, 64))
    assert torch.equal(fallback.swiglu(x[:, :64], w2), reference_swiglu(x[:, :64], w2))


def test_mismatched_features_raise(cpu: CpuBackend) -> None:
    w = nf4.quantise(torch.randn(8, 128))
    with pytest.raises(RuntimeError):
        cpu.linear(torch.randn(2, 64), w)


# --- building under a lock -------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_a_killed_build_does_not_block_the_next_load(cpu: CpuBackend, settings) -> None:
    baton = build_dir(settings.cache_dir) / "lock"
    # What a build killed mid-way leaves: cpp_extension's lock file, our flock released.
    with build_lock_path(settings.cache_dir).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        baton.touch()
    try:
        backend = CpuBackend(settings.cache_dir)
    finally:
        baton.unlink(missing_ok=True)  # never leave it to hang another process
    assert backend.native
    torch.manual_seed(11)
    w = nf4.quantise(torch.randn(24, 192), torch.randn(24))
    check(backend, torch.randn(3, 192), w)


@pytest.mark.timeout(60)
def test_a_build_held_elsewhere_falls_back_after_the_wait(settings) -> None:
    lock = build_lock_path(settings.cache_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        backend = CpuBackend(settings.cache_dir, build_wait_s=0.5)
        waited = time.monotonic() - began
    finally:
        holder.kill()
        holder.wait()
    assert not backend.native
    assert waited >= 0.5  # it waited out its bound before giving up
    w = nf4.quantise(torch.randn(9, 100), torch.randn(9))
    x = torch.randn(4, 100)
    assert torch.equal(backend.linear(x, w), reference_linear(x, w))


def test_use_threads_puts_torch_on_one_thread(cpu: CpuBackend, settings) -> None:
    before = torch.get_num_threads()
    try:
        threads = cpu.use_threads()
        assert torch.get_num_threads() == 1
        assert threads == cpu.set_threads(threads) >= 1  # the kernels' pool, now fixed
    finally:
        torch.set_num_threads(before)
    fallback = CpuBackend(settings.cache_dir, native=False)
    assert fallback.use_threads(3) == torch.get_num_threads() == before  # left alone


@pytest.mark.parametrize("swiglu", [False, True])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(cpu: CpuBackend, swiglu):
    """Batched decode must give each stream exactly what it gets alone, else a stream's
    greedy reply would change with whoever else is talking."""
    torch.manual_seed(5)
    w = nf4.quantise(torch.randn(2 * 300, 576) * 0.1)
    fn = cpu.bind(w, swiglu=swiglu)
    x = torch.randn(9, 576)
    alone = fn(x[:1])[0]
    for m in (2, 3, 4, 5, 8, 9):
        assert torch.equal(fn(x[:m])[0], alone), m
