"""Both instruction paths of the CPU kernels give the same numbers to the bit.

Machines running Parley have AVX-512 VNNI (VPDPBUSD) or only AVX2 (PMADDUBSW + PMADDWD);
the kernels promise the same integers on both. On a VNNI machine this builds the
extension a second time with AVX-512 switched off (about 40 s, once per source into the
model cache) and compares it with the default build the CPU backend runs, on every native
block type and both activation settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from agent.decoder import native
from agent.decoder.kernels import get_backend
from agent.decoder.kernels.cpu import (
    CFLAGS,
    LAYOUT_CODES,
    SOURCE,
    CpuBackend,
    _cpu_fingerprint,
    build_key,
)
from tests.unit.test_native_weights import random_blocks

AVX2_ONLY = ("-mno-avx512f", "-mno-avxvnni")  # -mno-avx512f takes every AVX-512 part along


def _build(cache_dir: Path, name: str, flags: tuple[str, ...]):
    """The extension compiled with `flags`, once per source, torch and CPU (build_key)."""
    from torch.utils import cpp_extension

    kernels = Path(cache_dir) / "kernels"
    folder = kernels / f"path_check_{name}_{build_key()}"
    for stale in kernels.glob(f"path_check_{name}_*"):  # builds of older sources
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=f"parley_path_check_{name}", sources=[str(SOURCE)],
                              extra_cflags=list(flags), extra_ldflags=["-pthread"],
                              build_directory=str(folder), verbose=False)


@pytest.fixture(scope="module")
def avx2(settings):
    """The AVX2-only build, beside the default (VNNI) one the CPU backend loaded."""
    if "avx512_vnni" not in _cpu_fingerprint().split():
        # Only a VNNI machine can run both builds; on an AVX2-only one the default build
        # is the AVX2 path, which the unit tests check against float32.
        pytest.skip("this CPU has no AVX-512 VNNI, so the VNNI build cannot run here")
    if not getattr(get_backend("cpu", settings.cache_dir), "native", False):
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    # With a compiler at hand a failed build is a failure: the AVX2 path must compile.
    return _build(settings.cache_dir, "avx2", (*CFLAGS, *AVX2_ONLY))


@pytest.mark.parametrize("qtype", list(native.LAYOUT_OF), ids=lambda q: q.name)
def test_vnni_and_avx2_give_the_same_products(settings, avx2, qtype: Q) -> None:
    assert avx2.simd_enabled()
    k = 768
    w = native.from_blocks(random_blocks(qtype, 40, k, seed=3), qtype, (40, k))
    # Large values in a few channels, as real activations carry them.
    x = torch.randn(9, k) * torch.where(torch.arange(k) % 97 == 0, 30.0, 1.0)
    for activations, passes in (("int8", 1), ("int8x2", 2)):  # bytes per value
        vnni = get_backend("cpu", settings.cache_dir, activations)
        assert isinstance(vnni, CpuBackend)
        for swiglu in (False, True):
            want = vnni.swiglu(x, w) if swiglu else vnni.linear(x, w)
            got = avx2.weight_linear(LAYOUT_CODES[w.layout], swiglu, passes, w.qweight,
                                     w.scales, w.offsets, w.bias, x)
            assert torch.equal(got, want), (activations, swiglu)
