"""The fast CPU backend: a C++ extension compiled once per machine into the model cache.

The extension (csrc/nf4_cpu.cpp) reads NF4 codes straight from memory, decodes them in
registers with a byte shuffle and takes int8 dot products against activations quantised
per 64-block, threaded on a pool of their own. Its results differ from the float32
reference by the activation rounding (per block, half a step of absmax / 127) and by the
7-bit copy of the codebook (half a step of 1 / 63 of the block scale); tests/unit/
test_kernels_cpu.py checks the exact bound that follows.

Where no compiler is present (or the build fails) the backend falls back to the reference
computation in PyTorch: correct, and much slower. `CpuBackend.native` says which one runs.

Builds are serialised by an flock of ours (kernels/build.lock in the cache). cpp_extension's
own `lock` file outlives a process killed while holding it, and every later load would wait
on it forever; the flock dies with its holder, so whoever holds it may delete that file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from agent.decoder.kernels import AnyWeight
from agent.decoder.kernels.reference import reference_linear, reference_swiglu
from agent.decoder.native import NativeWeight
from agent.decoder.nf4 import NF4Weight
from agent.decoder.q8 import Q8Weight

# The extension's numbers for the layouts (csrc/nf4_cpu.cpp, enum Kind).
LAYOUT_CODES = {"nf4": 0, "q8": 1, "u4": 2, "i8": 3, "i8x16": 4}


def layout_code(w: AnyWeight) -> int:
    if isinstance(w, NativeWeight):
        return LAYOUT_CODES[w.layout]
    return LAYOUT_CODES["q8" if isinstance(w, Q8Weight) else "nf4"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "nf4_cpu.cpp"
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast")
# How long to wait for another process's build (a first build takes about a minute on two
# cores) before serving with the PyTorch fallback instead.
BUILD_WAIT_S = 600.0


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: the build is only valid on the same CPU features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    digest = hashlib.sha256()
    sources = [p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    for part in (*sources, " ".join(CFLAGS).encode(), torch.__version__.encode(),
                 _cpu_fingerprint().encode()):
        digest.update(part)
    return digest.hexdigest()[:12]


def build_dir(cache_dir: Path) -> Path:
    """Where this source, compiler flags, torch and CPU build the extension."""
    return Path(cache_dir) / "kernels" / f"nf4_cpu_{build_key()}"


def build_lock_path(cache_dir: Path) -> Path:
    """The file whose flock serialises builds (one for every key: cleanup removes old ones)."""
    return Path(cache_dir) / "kernels" / "build.lock"


def load_extension(cache_dir: Path, wait_s: float = BUILD_WAIT_S) -> ModuleType | None:
    """Compile (first time, ~1 minute) or load the extension; None when it cannot be built.

    Waits at most `wait_s` seconds for a build in another process, then gives None too.
    """
    folder = build_dir(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(build_lock_path(cache_dir), wait_s):
            return _build(folder)
    except TimeoutError:
        log.warning("another process has been building the NF4 CPU kernels for over %.0f s "
                    "(%s); using the PyTorch fallback", wait_s, build_lock_path(cache_dir))
    except OSError as exc:  # an unwritable cache
        log.warning("NF4 CPU kernels unavailable (%s); using the PyTorch fallback", exc)
    return None


@contextlib.contextmanager
def _exclusive(path: Path, wait_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting at most `wait_s` s (else TimeoutError)."""
    deadline = time.monotonic() + wait_s
    with path.open("a") as handle:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{path} is held by another process") from None
                if not told:
                    log.warning("waiting for another process building the NF4 CPU kernels")
                    told = True
                time.sleep(min(0.2, left))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(folder: Path) -> ModuleType | None:
    """cpp_extension.load into `folder`; the caller holds the build flock."""
    from torch.utils import cpp_extension

    baton = folder / "lock"  # cpp_extension's; nobody alive holds it while we hold the flock
    if baton.exists():
        log.warning("removing %s, left by a kernel build that was killed", baton)
        baton.unlink(missing_ok=True)
    if not any(folder.glob("*.so")):
        log.warning("compiling the NF4 CPU kernels once into %s (about a minute)", folder)
    try:
        module = cpp_extension.load(
            name=f"parley_{folder.name}",
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-pthread"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja surfaces as many error types
        log.warning("NF4 CPU kernels unavailable (%s); using the PyTorch fallback", exc)
        return None
    for stale in folder.parent.glob("nf4_cpu_*"):  # builds of older sources
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return module


class CpuBackend:
    name = "cpu"

    def __init__(self, cache_dir: Path | None = None, native: bool = True,
                 build_wait_s: float = BUILD_WAIT_S, activations: str = "int8x2"):
        if cache_dir is None:
            from agent.config import load_settings

            cache_dir = load_settings().cache_dir
        self._ext = load_extension(cache_dir, build_wait_s) if native else None
        # Bytes per activation value for native weights, 2 for int8x2 (kernels/__init__.py).
        self.activations = activations
        self._passes = 2 if activations == "int8x2" else 1
        # torch's count before anyone lowers it: the cores it may use (or OMP_NUM_THREADS).
        self._default_threads = torch.get_num_threads()

    @property
    def native(self) -> bool:
        """True when the compiled kernels run; False on the PyTorch fallback."""
        return self._ext is not None

    @property
    def simd(self) -> bool:
        return self._ext is not None and bool(self._ext.simd_enabled())

    def prepare(self, w: AnyWeight) -> AnyWeight:
        """Float16 scales (double quantisation undone once), contiguous CPU tensors."""
        if isinstance(w, Q8Weight | NativeWeight):
            return w.to("cpu")
        scales = w.block_scales(torch.float16) if w.double_quantised else w.scales
        return NF4Weight(
            qweight=w.qweight.cpu().contiguous(),
            scales=scales.to(torch.float16).cpu().contiguous(),
            shape=w.shape,
            bias=None if w.bias is None else w.bias.to(torch.float32).cpu().contiguous(),
        )

    def linear(self, x: Tensor, w: AnyWeight) -> Tensor:
        return self.bind(w)(x)

    def swiglu(self, x: Tensor, w: AnyWeight) -> Tensor:
        return self.bind(w, swiglu=True)(x)

    def bind(self, w: AnyWeight, swiglu: bool = False) -> Callable[[Tensor], Tensor]:
        """One C++ call per use: the weight's tensors are bound here, not looked up per call."""
        if self._ext is None:
            fn = reference_swiglu if swiglu else reference_linear
            return partial(_swap_args, fn, w)
        w = self._ready(w)
        if isinstance(w, NativeWeight):
            return partial(self._ext.weight_linear, layout_code(w), swiglu, self._passes,
                           w.qweight, w.scales, w.offsets, w.bias)
        if isinstance(w, Q8Weight):
            return partial(self._ext.q8_linear, w.qweight, w.scales, w.bias)
        op = self._ext.swiglu if swiglu else self._ext.linear
        return partial(op, w.qweight, w.scales, w.bias)

    def rms_norm_kernel(self) -> Callable[[Tensor, Tensor, float], Tensor] | None:
        """A one-call RMSNorm (x, weight, eps), or None on the fallback.

        torch's CPU rms_norm dispatches about eight small ops (~40 us for one 576-wide row
        here); sixty of them per decode step cost more than the attention.
        """
        return None if self._ext is None else self._ext.rms_norm

    def token_attention_kernel(self) -> Callable[..., Tensor] | None:
        """One call per layer for the attention of new tokens (RoPE, cache write,
        softmax; see csrc/attention.h), or None on the fallback. The PyTorch path spends
        ~12 ops and scaled_dot_product_attention, ~150 us a layer, mostly dispatch."""
        return None if self._ext is None else self._ext.token_attention

    def block_kernel(self, norm1: Tensor, wqkv: NF4Weight, wo: NF4Weight, norm2: Tensor,
                     w13: NF4Weight, w2: NF4Weight, eps: float) -> Callable[..., Tensor] | None:
        """New tokens through a whole transformer block in one call (csrc block_forward:
        the kernels the modules would call, in the same order), bound to the block's
        weights: (x, k_cache, v_cache, layer, slots, positions, cos, sin, n_head,
        n_kv_head) -> x. None on the fallback."""
        if self._ext is None:
            return None
        ready = [self._ready(w) for w in (wqkv, wo, w13, w2)]
        none = torch.empty(0)

        def parts(w: AnyWeight) -> list[Tensor]:
            offsets = w.offsets if isinstance(w, NativeWeight) else None
            return [w.qweight, w.scales, none if offsets is None else offsets]

        def norm(weight: Tensor) -> Tensor:
            return weight.detach().float().contiguous()

        r_qkv, r_o, r_13, r_2 = ready
        tensors = [norm(norm1), *parts(r_qkv), *parts(r_o), norm(norm2), *parts(r_13),
                   *parts(r_2)]
        kinds = [layout_code(w) for w in ready]
        passes = [self._passes if isinstance(w, NativeWeight) else 1 for w in ready]
        return partial(self._ext.block_forward, tensors, kinds, passes, r_qkv.bias, eps)

    def set_threads(self, n: int) -> int:
        """Fix the kernels' thread count (before their first use); returns the count in effect.

        The kernels run on their own pool, not torch's: it never waits for a thread the OS
        has not scheduled, which matters on a small machine shared with speech models.
        """
        return 1 if self._ext is None else int(self._ext.set_threads(n))

    def use_threads(self, n: int = 0) -> int:
        """Kernels on `n` threads (0: torch's count when this backend was made), torch's own
        ops on one; returns the kernels' count. The fallback keeps torch's threads.

        torch's OpenMP team waits at every op for all its threads; on a busy small machine a
        descheduled one stalls each op for a time slice (decode fell to ~2 tok/s with two
        torch threads here). The decode step's torch ops are tiny, so one thread costs little.
        torch's setting is process-wide: every later torch op runs on one thread.
        """
        if self._ext is None:
            return torch.get_num_threads()
        threads = self.set_threads(n if n > 0 else self._default_threads)
        torch.set_num_threads(1)
        return threads

    def _ready(self, w: AnyWeight) -> AnyWeight:
        if isinstance(w, NativeWeight):
            return w.to("cpu")
        ok = ((isinstance(w, Q8Weight) or not w.double_quantised)
              and w.scales.dtype == torch.float16
              and w.qweight.is_contiguous() and w.scales.is_contiguous())
        return w if ok else self.prepare(w)


def _swap_args(fn: Callable[[Tensor, Any], Tensor], w: AnyWeight, x: Tensor) -> Tensor:
    return fn(x, w)
