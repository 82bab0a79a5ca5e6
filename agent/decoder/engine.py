"""Load a language model by name or path (a GGUF file or a Hugging Face checkpoint folder)
into a tokenizer and a model on the decoder's kernels.

    engine = load_engine("smollm2", settings=settings, backend="auto")

`backend` is explicit, never guessed from a file name:
    "auto"       the kernel registry's choice: "triton" where torch sees CUDA, else "cpu"
    "cpu" | "reference"   quantised linears on that kernel backend, the model on the CPU
    "triton"     the Triton kernels, and the whole model (embeddings, norms, KV cache,
                 sampling) on CUDA; on CPU tensors under TRITON_INTERPRET=1 (tests)
    "fp32"       no quantisation: the dequantised GGUF weights in nn.Linear (ground truth)

The weights format (`llm_weights`) is explicit too: "auto" runs a quantised GGUF's own
blocks and quantises 16-bit weights (an F16/BF16 GGUF, a safetensors checkpoint) to NF4.
NF4 weights are cached in the model cache (quantize.py keys them by the source's sha256);
with a cache present the linear matrices are not even read.

Prompt fitting lives here too: when a conversation outgrows the context, the system
message stays and the oldest turns go, at message level, before tokenising.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent import assets
from agent.config import Settings, load_settings
from agent.decoder.gguf_loader import load_gguf, read_header
from agent.decoder.hf_loader import is_checkpoint_folder, load_hf_tensors, read_hf_header
from agent.decoder.model import ModelArgs, Transformer, build_model, is_linear_tensor
from agent.decoder.tokenizer import Tokenizer
from agent.errors import ConfigError, InvalidRequestError

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "cpu", "triton", "reference", "fp32")


@dataclass
class Engine:
    """A loaded model: what the scheduler and the benchmark need."""

    name: str
    path: Path
    args: ModelArgs
    model: Transformer
    tokenizer: Tokenizer
    backend: str  # "fp32" or the kernel backend actually in use
    load_seconds: float
    weights: str = "fp32"  # what the linears run in, e.g. "native (Q4_1, Q8_0)", "nf4"
    activations: str = "fp32"  # what they multiply: "int8x2", "int8" (kernels), "fp32"

    @property
    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.n_layer * a.n_kv_head * a.head_dim * self.model.cache_dtype.itemsize

    def weight_bytes(self) -> int:
        """Bytes of weights held in memory (NF4 linears + float embedding and norms)."""
        try:
            from agent.decoder.quantize import weight_bytes
        except ImportError:
            from agent.decoder.model import parameter_bytes

            return parameter_bytes(self.model)
        return weight_bytes(self.model)["total"]

    def encode_prompt(self, text: str, *, raw: bool = False,
                      system: str | None = None) -> list[int]:
        """Ids of a one-shot prompt: through the chat template unless `raw`."""
        if raw or not self.tokenizer.has_chat_template:
            return self.tokenizer.encode(text, special=False)
        messages = ([{"role": "system", "content": system}] if system else [])
        return self.tokenizer.encode_chat([*messages, {"role": "user", "content": text}])

    def fit_messages(self, messages: Sequence[dict[str, Any]], budget: int, *,
                     tools: Sequence[dict[str, Any]] | None = None) -> tuple[list[int], int]:
        """Prompt ids of `messages` in at most `budget` tokens, and how many messages went.

        Keeps a leading system message, then drops whole turns (a user message and what
        follows it up to the next user message) from the oldest, re-rendering each time.
        Raises InvalidRequestError when even the last turn alone does not fit.
        """
        ids = self.tokenizer.encode_chat(messages, tools=tools)
        if len(ids) <= budget:
            return ids, 0
        head = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
        turns = _turns(messages[len(head):])
        dropped = 0
        while len(turns) > 1:
            dropped += len(turns.pop(0))
            ids = self.tokenizer.encode_chat([*head, *[m for t in turns for m in t]],
                                             tools=tools)
            if len(ids) <= budget:
                log.info("context: dropped the %d oldest messages to fit %d tokens",
                         dropped, budget)
                return ids, dropped
        raise InvalidRequestError(
            f"the last message needs {len(ids)} tokens, more than the {budget} the "
            f"context leaves", param="messages", code="context_length_exceeded")


def _turns(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Messages grouped into turns, each starting at a user message."""
    turns: list[list[dict[str, Any]]] = []
    for m in messages:
        if m.get("role") == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def resolve_model_path(model: str | Path, settings: Settings) -> tuple[str, Path]:
    """(display name, path) for a bundled model name, a .gguf path or a checkpoint folder."""
    name = str(model)
    if name in assets.MODELS:
        if assets.MODELS[name].role != "llm":
            raise ConfigError(f"{name!r} is not a language model")
        return name, assets.resolve(name, settings.cache_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return path.stem, path
    if is_checkpoint_folder(path):
        return path.name, path
    llms = ", ".join(n for n, s in assets.MODELS.items() if s.role == "llm")
    raise ConfigError(f"no language model {name!r}: use one of {llms}, a .gguf file path or "
                      f"a Hugging Face checkpoint folder (config.json + *.safetensors)")


def _quantise(model: Transformer, backend: str, settings: Settings, source: Path,
              progress: bool, weights: str, tensor_types: dict[str, str]) -> str:
    from agent.decoder.kernels import auto_backend_name, get_backend
    from agent.decoder.quantize import nf4_cache_path, quantize_model

    name = auto_backend_name() if backend == "auto" else backend
    kernel = get_backend(name, Path(settings.cache_dir), settings.llm_activations)
    use_threads = getattr(kernel, "use_threads", None)
    if use_threads is not None:  # before the kernels first run: their pool is sized once
        threads = use_threads(settings.llm_threads)
        log.info("%s kernels on %d threads, torch on %d", name, threads,
                 torch.get_num_threads())
    double_quant = settings.llm_nf4_double_quant
    quantize_model(model, kernel,
                   nf4_cache_path(Path(settings.cache_dir), source, double_quant=double_quant),
                   progress=progress, weights=weights, gguf_path=source,
                   tensor_types=tensor_types, double_quant=double_quant)
    device = getattr(kernel, "device", None)
    if device is not None:  # the rest of the model joins the kernels' device
        model.to(device)
        log.info("decoder on %s", device)
    return name


TensorReader = Callable[[Callable[[str], bool] | None], dict[str, torch.Tensor]]


def _open_source(path: Path) -> tuple[ModelArgs, Tokenizer, dict[str, str], TensorReader]:
    """A GGUF file's or a checkpoint folder's model shape, tokenizer, tensor types (GGUF
    names) and a reader of its float32 tensors (all but those a predicate skips)."""
    if is_checkpoint_folder(path):
        header = read_hf_header(path)
        return (header.args, Tokenizer(header.vocabulary), dict(header.tensor_types),
                lambda skip: load_hf_tensors(header, skip=skip))
    meta, infos = read_header(path)
    return (ModelArgs.from_gguf(meta, {i.name for i in infos}), Tokenizer.from_metadata(meta),
            {i.name: i.qtype.name for i in infos},
            lambda skip: load_gguf(path, skip=skip).tensors)


def source_tensor_types(path: Path) -> dict[str, str]:
    """Tensor name (GGUF's) -> stored type ("Q4_1", "BF16", ...) of a file or a folder."""
    if is_checkpoint_folder(path):
        return dict(read_hf_header(path).tensor_types)
    return {i.name: i.qtype.name for i in read_header(path)[1]}


def _nf4_cached(settings: Settings, source: Path) -> bool:
    try:
        from agent.decoder.quantize import nf4_cache_path
    except ImportError:
        return False
    return nf4_cache_path(Path(settings.cache_dir), source,
                          double_quant=settings.llm_nf4_double_quant).is_file()


def load_engine(model: str | Path | None = None, *, settings: Settings | None = None,
                backend: str = "auto", progress: bool = True) -> Engine:
    """Read the GGUF, build the tokenizer and the model, put NF4 kernels in (unless fp32).

    With the compiled CPU kernels this also sets the process's threading, as the benchmark
    runs: kernels on `settings.llm_threads` (0: the cores), torch's own ops on one thread.
    """
    settings = settings or load_settings()
    if backend not in BACKEND_CHOICES:
        raise ConfigError(f"unknown backend {backend!r}; choose {', '.join(BACKEND_CHOICES)}")
    began = time.perf_counter()
    name, path = resolve_model_path(model or settings.llm_model, settings)
    args, tokenizer, types, read_tensors = _open_source(path)
    fmt = "fp32"
    skip: Callable[[str], bool] | None = None
    if backend != "fp32":
        from agent.decoder.quantize import native_skippable, resolve_weights

        fmt = resolve_weights(settings.llm_weights, types)
        if fmt == "native":
            skip = native_skippable(types)
        elif fmt == "nf4" and _nf4_cached(settings, path):
            skip = is_linear_tensor
    net = build_model(args, read_tensors(skip))
    used = "fp32"
    if backend != "fp32":
        try:
            used = _quantise(net, backend, settings, path, progress, fmt, types)
        except ConfigError:
            if skip is None or fmt != "nf4":
                raise
            # A stale or foreign NF4 cache: quantise afresh from the full weights.
            net = build_model(args, read_tensors(None))
            used = _quantise(net, backend, settings, path, progress, fmt, types)
    from agent.decoder.quantize import activations_format, weights_format

    return Engine(name=name, path=path, args=args, model=net, tokenizer=tokenizer,
                  backend=used, weights=weights_format(net),
                  activations=activations_format(net),
                  load_seconds=time.perf_counter() - began)
