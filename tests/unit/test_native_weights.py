"""The GGUF file's own blocks on the CPU kernels: the same weights, nothing rounded twice.

Per block type: the native layout dequantises to exactly what gguf's own dequantiser
gives, and the kernel's products equal the float32 product of those weights with the
activations it uses: per-32 int8 (as llama.cpp), or that with a low byte for its rounding
error (the default, int8x2). Real tensors of both bundled files cover Q4_1,
Q8_0, Q5_0, Q4_K and Q6_K; random valid blocks cover every type.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from agent import assets
from agent.decoder import native
from agent.decoder.gguf_loader import read_blocks, read_header
from agent.decoder.kernels import ACTIVATIONS, get_backend
from agent.decoder.kernels.cpu import CpuBackend
from agent.decoder.quantize import planned_format, resolve_weights
from tests.decoder_fixtures import random_blocks

K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


@pytest.fixture(scope="module", params=ACTIVATIONS)
def cpu(settings, request) -> CpuBackend:
    backend = get_backend("cpu", settings.cache_dir, request.param)
    assert isinstance(backend, CpuBackend)
    if not backend.native:
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    return backend


def quantised_activations(x: torch.Tensor, kp: int, activations: str = "int8") -> torch.Tensor:
    """x as the kernels multiply it: per 32 values q = round(x * 127 / amax) at amax / 127;
    int8x2 adds a low byte, lo = round((x * 127 / amax - q) * 256) within +-127."""
    padded = F.pad(x.float(), (0, kp - x.shape[-1])).reshape(x.shape[0], -1, 32)
    amax = padded.abs().amax(dim=2, keepdim=True)
    scaled = padded * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(scaled)
    if activations == "int8x2":
        q = q + torch.round((scaled - q) * 256.0).clamp(-127, 127) / 256.0
    return (q * (amax / 127.0)).reshape(x.shape[0], kp)[:, :x.shape[-1]]


def check_kernel(cpu: CpuBackend, w: native.NativeWeight, m: int) -> None:
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
    weight = native.dequantise(w)
    xq = quantised_activations(x, w.padded_k, cpu.activations)
    want = xq @ weight.T
    got = cpu.linear(x, w)
    slack = 2e-5 * (xq.abs() @ weight.abs().T) + 1e-6
    assert ((got - want).abs() <= slack).all(), float((got - want).abs().max())


@pytest.mark.parametrize("qtype", list(native.LAYOUT_OF), ids=lambda q: q.name)
def test_every_type_dequantises_exactly_as_gguf(qtype: Q) -> None:
    k = 768 if qtype in K_QUANTS else 576
    raw = random_blocks(qtype, 24, k)
    w = native.from_blocks(raw, qtype, (24, k))
    want = dequantize(raw, qtype).reshape(24, k)
    assert np.array_equal(native.dequantise(w).numpy(), want)
    assert w.layout == native.LAYOUT_OF[qtype]


@pytest.mark.parametrize("qtype", list(native.LAYOUT_OF), ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 3, 8, 19])
def test_kernel_multiplies_the_files_weights(cpu: CpuBackend, qtype: Q, m: int) -> None:
    k = 4864 if qtype in K_QUANTS else 896  # Qwen's ffn_down and hidden widths
    w = native.from_blocks(random_blocks(qtype, 40, k, seed=m), qtype, (40, k))
    check_kernel(cpu, w, m)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
def test_swiglu_and_bias_on_native_weights(cpu: CpuBackend, qtype: Q) -> None:
    k = 768 if qtype in K_QUANTS else 576
    w = native.from_blocks(random_blocks(qtype, 32, k), qtype, (32, k),
                           bias=torch.linspace(-1, 1, 32))
    x = torch.randn(5, k)
    xq = quantised_activations(x, w.padded_k, cpu.activations)
    gate, up = (xq @ native.dequantise(w).T + w.bias).chunk(2, dim=-1)
    # float32 sums in another order over K terms, then an exp of 1.3e-7 relative error
    torch.testing.assert_close(cpu.swiglu(x, w), F.silu(gate) * up, rtol=1e-3, atol=1e-3)


def test_fused_parts_of_different_types_keep_their_values(cpu: CpuBackend) -> None:
    # Qwen's wqkv mixes Q5_0 and Q8_0; a Q4_1 and a Q6_K part meet in the widest layout.
    parts = [native.from_blocks(random_blocks(t, 16, 768, seed=i), t, (16, 768))
             for i, t in enumerate((Q.Q4_1, Q.Q6_K, Q.Q8_0))]
    fused = native.concat_rows(parts)
    assert fused.layout == "i8x16" and fused.shape == (48, 768)
    assert torch.equal(native.dequantise(fused),
                       torch.cat([native.dequantise(p) for p in parts]))
    check_kernel(cpu, fused, 4)


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5-coder-0.5b"])
def test_real_tensors_of_the_bundled_files(cpu: CpuBackend, settings, model: str) -> None:
    path = assets.resolve(model, settings.cache_dir)
    _, infos = read_header(path)
    picked: dict[str, str] = {}
    for info in infos:  # the first linear tensor of each type the file holds
        if info.qtype in native.LAYOUT_OF and info.qtype.name not in picked.values():
            picked[info.name] = info.qtype.name
    blocks = read_blocks(path, list(picked))
    for name in picked:
        qtype, raw = blocks[name]
        rows = raw[:64]
        k = rows.shape[1] // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]
        w = native.from_blocks(rows, qtype, (rows.shape[0], k))
        assert np.array_equal(native.dequantise(w).numpy(),
                              dequantize(rows, qtype).reshape(rows.shape[0], k)), name
        check_kernel(cpu, w, 3)


def test_two_passes_come_within_a_hundredth_of_one_pass_error(settings) -> None:
    # What int8x2 is for: products as the float32 ones of the file's weights, so that a
    # near tie between two tokens (SmolLM2's "The" and "L" for "What is the capital of
    # France?", 0.08 apart) falls as fp32 decides it.
    once, twice = (get_backend("cpu", settings.cache_dir, a) for a in ("int8", "int8x2"))
    if not once.native:
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    w = native.from_blocks(random_blocks(Q.Q4_1, 64, 576), Q.Q4_1, (64, 576))
    x = torch.randn(4, 576) * torch.where(torch.arange(576) % 97 == 0, 30.0, 1.0)  # outliers
    exact = x @ native.dequantise(w).T
    err_once = (once.linear(x, w) - exact).abs().max()
    err_twice = (twice.linear(x, w) - exact).abs().max()
    assert err_twice < err_once / 100, (float(err_once), float(err_twice))


def test_the_format_follows_the_tensor_types() -> None:
    quantised = {"blk.0.attn_q.weight": "Q4_1", "blk.0.attn_norm.weight": "F32",
                 "output.weight": "Q8_0"}
    assert resolve_weights("auto", quantised) == "native"
    assert resolve_weights("auto", {**quantised, "blk.0.attn_q.weight": "F16"}) == "nf4"
    assert resolve_weights("nf4", quantised) == "nf4"
    with pytest.raises(Exception, match="llm_weights"):
        resolve_weights("int3", quantised)


def test_the_planned_format_names_every_source_type_the_tied_head_included() -> None:
    tied = {"blk.0.attn_q.weight": "Q4_1", "blk.0.ffn_down.weight": "Q4_1",
            "token_embd.weight": "Q8_0", "output_norm.weight": "F32"}
    assert planned_format("auto", tied) == "native (Q4_1, Q8_0)"
    assert planned_format("auto", {**tied, "token_embd.weight": "F16"}) == "native+fp32 (Q4_1)"
    assert planned_format("auto", {**tied, "output.weight": "Q6_K"}) == "native (Q4_1, Q6_K)"
    assert planned_format("q8", tied) == "q8"
