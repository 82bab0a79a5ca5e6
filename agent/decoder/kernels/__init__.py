"""NF4 matmul kernels behind one narrow interface.

A backend turns activations x [..., K] and an `NF4Weight` W [N, K] into x @ W.T (+ bias):

    backend.linear(x, w)  -> [..., N]
    backend.swiglu(x, w)  -> [..., N // 2]   w holds [gate; up] rows: silu(x@Wg.T) * (x@Wu.T)
    backend.bind(w, swiglu=False) -> callable x -> y   the same, with per-call work hoisted
    backend.prepare(w)    -> w on the backend's device, in the form its kernels read

Backends, by name:
    "reference"  dequantise, then a float32 matmul in PyTorch: the ground truth for tests.
    "cpu"        a C++ extension (AVX2/FMA/F16C, int8 dot products, fused dequantisation),
                 compiled once into the model cache; plain PyTorch when it cannot be built.
    "triton"     Triton kernels for CUDA (triton_backend.py): NF4, the GGUF's own blocks and
                 the 8-bit head, and new tokens' attention; the whole model then runs on
                 CUDA (engine.py moves it there).
    "auto"       "triton" where torch sees CUDA and Triton is installed, else "cpu".

Outputs have x's dtype; every backend accumulates in float32.

Optional extras a backend may offer (quantize.py and the benchmark look for them):
    rms_norm_kernel() -> callable (x, weight, eps) -> y, or None   a one-call RMSNorm
    token_attention_kernel() -> callable, or None   new tokens' attention in one call
        (qkv, k_cache, v_cache, layer, slots, positions, cos, sin, n_head, n_kv_head) -> y;
        it reads and writes float16 caches, so a model given it keeps its KV cache in float16;
        with it, `token_attention_prefill` (default True) says whether prompt chunks go
        through it too (the Triton backend's do not: PyTorch's flash attention does them)
    device   where the backend's kernels run; the engine moves the rest of the model there
    block_kernel(norm1, wqkv, wo, norm2, w13, w2, eps) -> callable, or None
        new tokens through a whole block of NF4 linears in one call
        (x, k_cache, v_cache, layer, slots, positions, cos, sin, n_head, n_kv_head) -> x
    set_threads(n) -> int   the kernels' own thread count, fixed before their first use
    use_threads(n) -> int   the threading the engine wants: kernels on n (0: default), torch on 1
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from torch import Tensor

from agent.decoder.native import NativeWeight
from agent.decoder.nf4 import NF4Weight
from agent.decoder.q8 import Q8Weight
from agent.errors import ConfigError

BACKENDS = ("reference", "cpu", "triton")
# How the CPU kernels take activations for the GGUF file's own weights (native): "int8x2"
# quantises each 32 values to int8 and their rounding error to a second byte, one 16-bit
# value dotted in two passes (answers as fp32's); "int8" once, as llama.cpp does.
ACTIVATIONS = ("int8x2", "int8")


# Every weight a backend multiplies: NF4, the 8-bit head, the GGUF's own blocks.
AnyWeight = NF4Weight | Q8Weight | NativeWeight


class Backend(Protocol):
    name: str

    def prepare(self, w: AnyWeight) -> AnyWeight: ...

    def linear(self, x: Tensor, w: AnyWeight) -> Tensor: ...

    def swiglu(self, x: Tensor, w: AnyWeight) -> Tensor: ...

    def bind(self, w: AnyWeight, swiglu: bool = False) -> Callable[[Tensor], Tensor]: ...


_loaded: dict[str, Backend] = {}


def auto_backend_name() -> str:
    """The backend "auto" stands for: "triton" on a machine with CUDA (and Triton), where
    the whole model then runs on the GPU, else "cpu"."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "cpu"


def get_backend(name: str = "auto", cache_dir: Path | None = None,
                activations: str = ACTIVATIONS[0]) -> Backend:
    """The backend called `name` (one instance per process and `activations`, which only
    the cpu backend's native weights use)."""
    if name == "auto":
        name = auto_backend_name()
    if name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of "
                          f"{', '.join(BACKENDS)} or auto")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"unknown llm_activations {activations!r}; choose one of "
                          f"{', '.join(ACTIVATIONS)}")
    key = f"{name}/{activations}" if name == "cpu" else name
    if key in _loaded:
        return _loaded[key]
    backend: Backend
    if name == "reference":
        from agent.decoder.kernels.reference import ReferenceBackend

        backend = ReferenceBackend()
    elif name == "cpu":
        from agent.decoder.kernels.cpu import CpuBackend

        backend = CpuBackend(cache_dir, activations=activations)
    else:
        from agent.decoder.kernels.triton_backend import TritonBackend

        backend = TritonBackend()
    _loaded[key] = backend
    return backend
