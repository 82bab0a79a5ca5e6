"""Both instruction paths of the CPU kernels give the same numbers to the bit.

Machines running Parley have AVX-512 VNNI (VPDPBUSD) or only AVX2 (PMADDUBSW + PMADDWD);
the kernels promise the same integers on both. On a VNNI machine this builds the
extension a second time with AVX-512 switched off (about a minute, once per source into
the model cache) and compares every native block type, both activation settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from agent.decoder import native
from agent.decoder.kernels.cpu import CFLAGS, CSRC, LAYOUT_CODES, SOURCE, _cpu_fingerprint
from tests.unit.test_native_weights import random_blocks

AVX2_ONLY = ("-mno-avx512f", "-mno-avxvnni")  # -mno-avx512f takes every AVX-512 part along


def _build(cache_dir: Path, name: str, flags: tuple[str, ...]):
    from torch.utils import cpp_extension

    digest = hashlib.sha256(" ".join(flags).encode())
    for part in sorted(CSRC.iterdir()):
        if part.suffix in (".cpp", ".h"):
            digest.update(part.read_bytes())
    folder = Path(cache_dir) / "kernels" / f"path_check_{name}_{digest.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=f"parley_path_check_{name}", sources=[str(SOURCE)],
                              extra_cflags=list(flags), extra_ldflags=["-pthread"],
                              build_directory=str(folder), verbose=False)


@pytest.fixture(scope="module")
def builds(settings):
    if "avx512_vnni" not in _cpu_fingerprint().split():
        pytest.skip("this CPU has no AVX-512 VNNI: the default build is the AVX2 path")
    try:
        return _build(settings.cache_dir, "vnni", CFLAGS), \
            _build(settings.cache_dir, "avx2", (*CFLAGS, *AVX2_ONLY))
    except Exception as exc:  # no compiler: the fallback path has nothing to compare
        pytest.skip(f"the kernels cannot be built here: {exc}")


@pytest.mark.parametrize("qtype", list(native.LAYOUT_OF), ids=lambda q: q.name)
def test_vnni_and_avx2_give_the_same_products(builds, qtype: Q) -> None:
    vnni, avx2 = builds
    assert vnni.simd_enabled() and avx2.simd_enabled()
    k = 768
    w = native.from_blocks(random_blocks(qtype, 40, k, seed=3), qtype, (40, k))
    # Large values in a few channels, as real activations carry them.
    x = torch.randn(9, k) * torch.where(torch.arange(k) % 97 == 0, 30.0, 1.0)
    for passes in (1, 2):
        for swiglu in (False, True):
            got = [ext.weight_linear(LAYOUT_CODES[w.layout], swiglu, passes, w.qweight,
                                     w.scales, w.offsets, w.bias, x) for ext in (vnni, avx2)]
            assert torch.equal(got[0], got[1]), (passes, swiglu)
