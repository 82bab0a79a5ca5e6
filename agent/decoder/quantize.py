"""Swap a built model's linears for NF4 ones, from outside the model (gpt-fast style).

`quantize_model(model, backend)` replaces every `nn.Linear` (fused wqkv / w13 included,
and the output head) with an `QuantLinear` that calls the chosen kernel backend. Modules
holding a fused gate/up `w13` and a `w2` become `QuantFeedForward`, which asks the backend
for silu(gate) * up in the same call as the matmul (one dispatch instead of four), and
RMSNorm modules become `KernelRMSNorm` where the backend has a one-call norm (the CPU
extension). The maths is the model's own in every case.

The embedding table is not quantised: a decode step reads one row of it, so it costs no
bandwidth. The output head IS quantised even when tied to the embedding (with SmolLM2's
49152 x 576 vocabulary it is the largest matrix a decode step reads), but to 8 bits, not
NF4: see agent/decoder/q8.py for the emoji-only replies NF4 caused there.

Quantised weights are cached on disk (`nf4_cache_path`, keyed by the GGUF's sha256 and
the NF4 format version); a second start loads them memory-mapped in well under a second,
and the linears' float weights may then stay on the meta device (never dequantised).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from agent.decoder import native, nf4, q8
from agent.decoder.kernels import AnyWeight, Backend, get_backend
from agent.decoder.native import NativeWeight
from agent.decoder.nf4 import NF4Weight
from agent.decoder.q8 import Q8Weight
from agent.errors import ConfigError
from agent.progress import step_bar

HEAD = "output"  # the output head's module name in model.Transformer
HEAD_FORMATS = ("q8", "nf4")
WEIGHT_FORMATS = ("native", "nf4", "q8")


def resolve_weights(choice: str, tensor_types: dict[str, str]) -> str:
    """The weight format `choice` ("auto" or one of WEIGHT_FORMATS) means for a file.

    "auto" is "native" when every linear tensor the file holds is of a block type the
    kernels read as it is, "nf4" when they arrive in 16 or 32 bits. Decided from the
    tensor types in the header, never from the file's name.
    """
    if choice in WEIGHT_FORMATS:
        return choice
    if choice != "auto":
        raise ConfigError(f"unknown llm_weights {choice!r}; choose auto or one of "
                          f"{', '.join(WEIGHT_FORMATS)}")
    linear = [t for name, t in tensor_types.items() if _is_linear_weight(name)]
    readable = {q.name for q in native.LAYOUT_OF}
    return "native" if linear and all(t in readable for t in linear) else "nf4"


def planned_format(choice: str, tensor_types: dict[str, str]) -> str:
    """What a file's linears will run in, labelled as weights_format labels a loaded model.

    Under native, a linear whose tensor the kernels cannot read raw (a 16-bit tied head, a
    16-bit layer named with llm_weights = "native") keeps its float values: "+fp32".
    """
    fmt = resolve_weights(choice, tensor_types)
    if fmt != "native":
        return fmt
    types = [t for name, t in tensor_types.items() if _is_linear_weight(name)]
    if "output.weight" not in tensor_types and "token_embd.weight" in tensor_types:
        types.append(tensor_types["token_embd.weight"])  # the tied head
    readable = {q.name for q in native.LAYOUT_OF}
    if not any(t in readable for t in types):
        return "fp32"  # native on float weights keeps them as they are
    label = "native+fp32" if any(t not in readable for t in types) else "native"
    return f"{label} ({', '.join(sorted({t for t in types if t in readable}))})"


def _is_linear_weight(name: str) -> bool:
    from agent.decoder.model import is_linear_tensor

    return is_linear_tensor(name) and name.endswith(".weight")


def native_skippable(tensor_types: dict[str, str]) -> Callable[[str], bool]:
    """Which float tensors a native load need not dequantise: linear weights it reads raw."""
    readable = {q.name for q in native.LAYOUT_OF}
    return lambda name: _is_linear_weight(name) and tensor_types.get(name) in readable


def gguf_parts(name: str, tied: bool) -> list[str]:
    """The GGUF tensors a model linear is made of, in row order (fused ones have several)."""
    if name == HEAD:
        return ["token_embd.weight" if tied else "output.weight"]
    _, layer, _, leaf = name.split(".")
    parts = {"wqkv": ["attn_q", "attn_k", "attn_v"], "wo": ["attn_output"],
             "w13": ["ffn_gate", "ffn_up"], "w2": ["ffn_down"]}[leaf]
    return [f"blk.{layer}.{p}.weight" for p in parts]




class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W quantised (NF4, 8-bit, or the file's own blocks); the
    backend's kernel does it."""

    def __init__(self, weight: AnyWeight, backend: Backend):
        super().__init__()
        weight = backend.prepare(weight)
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        # Buffers, so parameter counts and `.to()`-style walks see the quantised bytes.
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("bias", weight.bias)
        self.quant_weight = weight
        self._linear = backend.bind(weight)
        self._swiglu: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x)

    def swiglu(self, x: Tensor) -> Tensor:
        """silu(x @ Wg.T) * (x @ Wu.T) for a fused [gate; up] weight: [..., N // 2]."""
        if self._swiglu is None:
            self._swiglu = self.backend.bind(self.quant_weight, swiglu=True)
        return self._swiglu(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend.name}")


class QuantFeedForward(nn.Module):
    """w2(silu(gate) * up) with w13 = [gate; up]: the SwiGLU runs inside the w13 kernel."""

    def __init__(self, w13: QuantLinear, w2: QuantLinear):
        super().__init__()
        self.w13 = w13
        self.w2 = w2

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.w13.swiglu(x))


class KernelRMSNorm(nn.Module):
    """RMSNorm computed by one backend call (same maths as model.RMSNorm, float32)."""

    def __init__(self, weight: Tensor, eps: float,
                 kernel: Callable[[Tensor, Tensor, float], Tensor]):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.eps = eps
        self._kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        return self._kernel(x, self.weight, self.eps)


def source_sha256(path: Path) -> str:
    """The sha256 of a GGUF file, or of a checkpoint folder's config and weights."""
    from agent.decoder.hf_loader import folder_sha256, is_checkpoint_folder

    if is_checkpoint_folder(path):
        return folder_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def nf4_cache_path(cache_dir: Path, gguf_path: Path, double_quant: bool = False,
                   scale_search: bool = True, head: str = "q8") -> Path:
    """Where the NF4 weights of a GGUF file (or a checkpoint folder) live: keyed by its
    sha256 and the format."""
    sha = source_sha256(gguf_path)[:16]
    suffix = (("-dq" if double_quant else "") + ("-ss" if scale_search else "")
              + ("-h8" if head == "q8" else ""))
    return (Path(cache_dir) / "nf4"
            / f"{gguf_path.stem}-{sha}-nf4v{nf4.FORMAT_VERSION}{suffix}.pt")


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in the model, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def quantise_linears(model: nn.Module, names: list[str], double_quant: bool = False,
                     scale_search: bool = True, progress: bool = True, head: str = "q8",
                     ) -> dict[str, NF4Weight | Q8Weight]:
    """NF4 weights for the named linears, 8-bit for the head with `head="q8"` (float
    weights must be materialised)."""
    tick = step_bar(len(names), "NF4 quantisation") if progress else None
    out: dict[str, NF4Weight | Q8Weight] = {}
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        if linear.weight.device.type == "meta":
            raise ConfigError(f"{name} has no weights to quantise (meta) and no NF4 cache")
        bias = linear.bias if linear.bias is not None else None
        if name == HEAD and head == "q8":
            out[name] = q8.quantise(linear.weight.data, bias)
        else:
            out[name] = nf4.quantise(linear.weight.data, bias, double_quant=double_quant,
                                     scale_search=scale_search)
        if tick:
            tick(1)
    return out


def cached_weights(cache_path: Path | None, model: nn.Module, names: list[str],
                   options: dict[str, str]) -> dict[str, NF4Weight | Q8Weight] | None:
    """The cached NF4 weights when the file holds exactly these linears, else None."""
    if cache_path is None or not Path(cache_path).is_file():
        return None
    loaded = nf4.load(Path(cache_path), meta=options)
    if loaded is None or sorted(loaded[0]) != sorted(names):
        return None
    for name in names:
        if loaded[0][name].shape != tuple(_linear(model, name).weight.shape):
            return None
    return loaded[0]


def native_weights(model: nn.Module, names: list[str], gguf_path: Path,
                   tensor_types: dict[str, str]) -> dict[str, NativeWeight]:
    """The file's own blocks for every linear whose parts are all natively readable."""
    from agent.decoder.gguf_loader import read_blocks

    tied = bool(getattr(getattr(model, "args", None), "tied_embeddings", False))
    readable = {q.name for q in native.LAYOUT_OF}
    wanted = {n: gguf_parts(n, tied) for n in names}
    wanted = {n: p for n, p in wanted.items() if all(tensor_types.get(t) in readable for t in p)}
    if not wanted:  # all in floats (a 16-bit GGUF, a checkpoint folder): nothing to read raw
        return {}
    blocks = read_blocks(gguf_path, sorted({t for p in wanted.values() for t in p}))
    out = {}
    for name, parts in wanted.items():
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        k = linear.in_features
        pieces = []
        for part in parts:
            qtype, raw = blocks[part]
            pieces.append(native.from_blocks(raw, qtype, (raw.shape[0], k)))
        w = native.concat_rows(pieces)
        if w.shape != tuple(linear.weight.shape):
            raise ConfigError(f"{name}: GGUF parts give {w.shape}, the model wants "
                              f"{tuple(linear.weight.shape)}")
        if linear.bias is not None:
            w.bias = linear.bias.detach().float().contiguous()
        out[name] = w
    return out


def weights_format(model: nn.Module) -> str:
    """What a model's linears run in: "native (Q4_1, Q8_0)", "nf4", "fp32", ..."""
    kinds: dict[str, None] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            w = mod.quant_weight
            kinds["native" if isinstance(w, NativeWeight) else
                  "q8" if isinstance(w, Q8Weight) else "nf4"] = None
        elif isinstance(mod, nn.Linear):
            kinds["fp32"] = None
    sources = sorted({t for mod in model.modules() if isinstance(mod, QuantLinear)
                      and isinstance(mod.quant_weight, NativeWeight)
                      for t in mod.quant_weight.source.split("+")})
    label = "+".join(kinds) or "fp32"
    return f"{label} ({', '.join(sources)})" if sources else label


def activations_format(model: nn.Module) -> str:
    """What a model's quantised linears multiply their weights with: "int8x2" or "int8"
    (the compiled CPU kernels: native weights as the backend takes them, NF4 and 8-bit
    ones always once), "fp32" (a float matmul: the fp32 and reference paths)."""
    kinds: dict[str, None] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and getattr(mod.backend, "native", False):
            kinds[getattr(mod.backend, "activations", "int8")
                  if isinstance(mod.quant_weight, NativeWeight) else "int8"] = None
    return "+".join(kinds) or "fp32"


def quantize_model(model: nn.Module, backend: Backend | str = "auto",
                   cache_path: Path | None = None, progress: bool = True,
                   double_quant: bool = False, scale_search: bool = True,
                   head: str = "q8", weights: str = "nf4", gguf_path: Path | None = None,
                   tensor_types: dict[str, str] | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` with an QuantLinear on `backend`, in place.

    The output head gets 8-bit weights unless `head="nf4"`.

    With `cache_path`, NF4 weights are read from that file when it matches the model (the
    linears may then be on the meta device) and written there otherwise; name the file with
    `nf4_cache_path` using the same options. `scale_search` (see nf4.quantise) costs about
    a minute once and makes the requantised GGUF markedly closer to the original.
    """
    if isinstance(backend, str):
        backend = get_backend(backend)
    if head not in HEAD_FORMATS:
        raise ConfigError(f"unknown head format {head!r}; choose one of {HEAD_FORMATS}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {weights!r}; choose {WEIGHT_FORMATS}")
    names = linear_names(model)
    chosen: dict[str, AnyWeight]
    if weights == "native":
        if gguf_path is None or tensor_types is None:
            raise ConfigError("native weights need the GGUF file they come from")
        # Linears stored in 16/32 bits keep their float values (nn.Linear).
        chosen = dict(native_weights(model, names, Path(gguf_path), tensor_types))
    elif weights == "q8":
        chosen = {name: q8.quantise(_float_weight(model, name),
                                    _linear(model, name).bias) for name in names}
    else:
        options = {"double_quant": str(double_quant), "scale_search": str(scale_search),
                   "head": head}
        cached = cached_weights(cache_path, model, names, options)
        if cached is None:
            cached = quantise_linears(model, names, double_quant, scale_search, progress, head)
            if cache_path is not None:
                nf4.save(Path(cache_path), cached, meta=options)
        chosen = dict(cached)
    return install_weights(model, chosen, backend)


def install_weights(model: nn.Module, weights: dict[str, AnyWeight],
                    backend: Backend) -> nn.Module:
    """Put quantised weights in place of the named linears, with the backend's fused
    paths (SwiGLU in the w13 call, its norm, attention and block kernels), in place."""
    for name, w in weights.items():
        _set_submodule(model, name, QuantLinear(w, backend))
    _fuse_feed_forwards(model)
    _swap_norms(model, backend)
    _fuse_kernel_paths(model, backend)
    return model


def _linear(model: nn.Module, name: str) -> nn.Linear:
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"{name} is a {type(linear).__name__}, not a linear layer")
    return linear


def _float_weight(model: nn.Module, name: str) -> Tensor:
    weight = _linear(model, name).weight
    if weight.device.type == "meta":
        raise ConfigError(f"{name} has no weights to quantise (meta)")
    return weight.data


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _fuse_feed_forwards(model: nn.Module) -> None:
    """Swap modules with NF4 `w13` + `w2` children for QuantFeedForward (same maths)."""
    targets = [name for name, mod in model.named_modules()
               if isinstance(getattr(mod, "w13", None), QuantLinear)
               and isinstance(getattr(mod, "w2", None), QuantLinear)
               and not isinstance(mod, QuantFeedForward)]
    for name in targets:
        mod = model.get_submodule(name)
        w13, w2 = mod.w13, mod.w2
        assert isinstance(w13, QuantLinear) and isinstance(w2, QuantLinear)
        if w13.out_features != 2 * w2.in_features:
            continue
        _set_submodule(model, name, QuantFeedForward(w13, w2))


def _swap_norms(model: nn.Module, backend: Backend) -> None:
    """Put the backend's one-call RMSNorm in place of model.RMSNorm, where it has one."""
    from agent.decoder.model import RMSNorm

    factory = getattr(backend, "rms_norm_kernel", None)
    kernel = factory() if factory else None
    if kernel is None:
        return
    names = [name for name, mod in model.named_modules() if isinstance(mod, RMSNorm)]
    for name in names:
        norm = model.get_submodule(name)
        assert isinstance(norm, RMSNorm)
        _set_submodule(model, name, KernelRMSNorm(norm.weight, norm.eps, kernel))


def _fuse_kernel_paths(model: nn.Module, backend: Backend) -> None:
    """Give the model the backend's one-call attention and each NF4 block its one-call
    forward, where the backend has them (see kernels/__init__.py)."""
    from agent.decoder.model import Transformer, TransformerBlock

    if not isinstance(model, Transformer):
        return
    attention = getattr(backend, "token_attention_kernel", None)
    model.token_attention = attention() if attention else None
    model.token_attention_prefill = getattr(backend, "token_attention_prefill", True)
    if model.token_attention is not None:  # it reads and writes float16 caches too
        model.cache_dtype = torch.float16
    block_kernel = getattr(backend, "block_kernel", None)
    for block in model.layers:
        assert isinstance(block, TransformerBlock)
        ff, att = block.feed_forward, block.attention
        if block_kernel is None or not isinstance(ff, QuantFeedForward) \
                or not isinstance(att.wqkv, QuantLinear) or not isinstance(att.wo, QuantLinear):
            continue
        block.kernel_forward = block_kernel(
            block.attention_norm.weight, att.wqkv.quant_weight, att.wo.quant_weight,
            block.ffn_norm.weight, ff.w13.quant_weight, ff.w2.quant_weight, model.args.norm_eps)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights in memory: quantised linears (NF4 and the 8-bit head), float
    parameters (embedding, norms), total.

    Tensors shared between modules (a tied embedding) are counted once; non-weight buffers
    (RoPE tables) are not counted.
    """
    nf4_tensors = [t for mod in model.modules() if isinstance(mod, QuantLinear)
                   for t in mod.buffers(recurse=False)]
    return _count(nf4_tensors, list(model.parameters()))


def _count(nf4_tensors: list[Tensor], params: list[Tensor]) -> dict[str, int]:
    seen: set[int] = set()
    totals = {"nf4": 0, "float": 0}
    for kind, tensors in (("nf4", nf4_tensors), ("float", params)):
        for t in tensors:
            if t.device.type == "meta" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            totals[kind] += t.numel() * t.element_size()
    return {**totals, "total": totals["nf4"] + totals["float"]}
