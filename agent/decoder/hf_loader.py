"""Read a Hugging Face checkpoint folder (Llama / Qwen2 family) as the decoder reads a GGUF.

A folder holds `config.json`, one or more `*.safetensors` files (16 or 32-bit weights),
`tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS), optionally
`generation_config.json` (extra end-of-generation ids). This module turns it into what the
GGUF path produces, so the engine, the quantiser and the kernels need no second code path:

- `ModelArgs` from config.json;
- a `Vocabulary` with llama.cpp's token types (added special tokens are CONTROL, other
  added tokens USER_DEFINED, the embedding's rows past the tokenizer padded as UNUSED
  `[PAD<id>]`, as llama.cpp's converter writes them), keeping the file's own normalizer
  and pre-tokenizer;
- float32 tensors under GGUF names, with their stored dtype ("BF16", "F16", "F32") as the
  tensor type, which is what makes `llm_weights = "auto"` choose NF4 for them.

Hugging Face stores Q/K rows in the "rotate half" order the model applies RoPE in, so
nothing is permuted here (a GGUF's rows are, see gguf_loader.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from agent.decoder.model import ARCH_PRESETS, ModelArgs
from agent.decoder.tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, Vocabulary
from agent.errors import ConfigError

FLOAT_DTYPES = {"BF16": "BF16", "F16": "F16", "F32": "F32"}  # safetensors -> GGUF type name

GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
LAYER_TENSORS = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
          "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
_LAYER_NAME_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some exporters save that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclass(frozen=True)
class HFHeader:
    """What a checkpoint folder says before any weight is read."""

    args: ModelArgs
    vocabulary: Vocabulary
    tensor_types: dict[str, str]  # GGUF name -> "BF16" | "F16" | "F32"
    sources: dict[str, tuple[Path, str]]  # GGUF name -> (safetensors file, stored name)


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face one; None for buffers the model recomputes."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    if _IGNORED.match(hf_name):
        return None
    match = _LAYER_NAME_RE.fullmatch(hf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    raise ConfigError(f"unexpected tensor {hf_name!r}: not a Llama/Qwen2 decoder weight")


def read_hf_header(folder: str | Path) -> HFHeader:
    folder = Path(folder)
    config = _json(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no .safetensors weights")
    types: dict[str, str] = {}
    sources: dict[str, tuple[Path, str]] = {}
    for file in files:
        for hf_name, dtype in _stored_dtypes(file).items():
            name = gguf_name(hf_name)
            if name is None:
                continue
            if dtype not in FLOAT_DTYPES:
                raise ConfigError(f"{file.name}: tensor {hf_name} is {dtype}; a checkpoint "
                                  f"must hold 16 or 32-bit floats")
            types[name] = FLOAT_DTYPES[dtype]
            sources[name] = (file, hf_name)
    args = model_args(config, set(types))
    if args.tied_embeddings:  # some exporters save the tied head anyway: it is the embedding
        types.pop("output.weight", None)
        sources.pop("output.weight", None)
    elif "output.weight" not in types:
        raise ConfigError(f"{folder}: tie_word_embeddings is false but there is no lm_head")
    vocabulary = read_vocabulary(folder, config, args.vocab_size)
    return HFHeader(args=args, vocabulary=vocabulary, tensor_types=types, sources=sources)


def model_args(config: dict[str, Any], tensor_names: set[str]) -> ModelArgs:
    """ModelArgs from a config.json (the fields Llama and Qwen2 configs share)."""
    arch = str(config.get("model_type", ""))
    if arch not in ARCH_PRESETS:
        raise ConfigError(f"unsupported model_type {arch!r}; known: {', '.join(ARCH_PRESETS)}")

    def key(name: str, default: Any = None) -> Any:
        value = config.get(name, default)
        if value is None:
            raise ConfigError(f"config.json lacks {name}")
        return value

    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "none")) if scaling else "none"
    if kind not in ("none", "default", "linear"):
        raise ConfigError(f"RoPE scaling {kind!r} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"activation {config['hidden_act']!r} is not supported (silu only)")
    n_head = int(key("num_attention_heads"))
    dim = int(key("hidden_size"))
    qkv_bias = bool(config.get("attention_bias", ARCH_PRESETS[arch]["qkv_bias"]))
    if "blk.0.attn_q.bias" in tensor_names:
        qkv_bias = True
    return ModelArgs(
        arch=arch, n_layer=int(key("num_hidden_layers")), dim=dim, n_head=n_head,
        n_kv_head=int(config.get("num_key_value_heads") or n_head),
        intermediate_size=int(key("intermediate_size")), vocab_size=int(key("vocab_size")),
        norm_eps=float(key("rms_norm_eps", 1e-6)),
        rope_theta=float(key("rope_theta", 10000.0)),
        rope_scale=float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0,
        context_length=int(key("max_position_embeddings")),
        head_dim=int(config.get("head_dim") or dim // n_head),
        qkv_bias=qkv_bias,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def read_vocabulary(folder: Path, config: dict[str, Any], n_vocab: int) -> Vocabulary:
    """The tokenizer files as a Vocabulary with llama.cpp's ids and token types."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json")
    spec = _json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise ConfigError(f"{path}: unsupported tokenizer (byte-level BPE only)")
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"],
                                   CONTROL if added.get("special") else USER_DEFINED)
    size = max(n_vocab, max(by_id) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # The file's own normalizer and pre-tokenizer: they are part of what its ids mean.
    parsed = HFTokenizer.from_file(str(path))
    settings = _json(folder / "tokenizer_config.json", required=False)
    ids = {t: i for i, (t, _) in enumerate(tokens)}
    return Vocabulary(
        tokens=[t for t, _ in tokens], types=[ty for _, ty in tokens], merges=merges,
        pre="tokenizer.json", bos_id=_token_id(settings.get("bos_token"), ids,
                                               config.get("bos_token_id")),
        eos_id=_token_id(settings.get("eos_token"), ids, config.get("eos_token_id")),
        add_bos=bool(settings.get("add_bos_token", False)),
        chat_template=_chat_template(folder, settings),
        extra_eog=_generation_eos(folder),
        pre_tokenizer=parsed.pre_tokenizer, normalizer=parsed.normalizer,
    )


def load_hf_tensors(header: HFHeader, *,
                    skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor (except those `skip` names) as float32, under its GGUF name."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, stored) in header.sources.items():
        if skip is None or not skip(name):
            by_file.setdefault(file, []).append((name, stored))
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as fh:
            for name, stored in names:
                out[name] = fh.get_tensor(stored).to(torch.float32).contiguous()
    return out


def folder_sha256(folder: Path) -> str:
    """One digest over the config and every weights file (what an NF4 cache is keyed by)."""
    digest = hashlib.sha256()
    for file in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _stored_dtypes(file: Path) -> dict[str, str]:
    """Tensor name -> dtype from a safetensors header, without reading the weights."""
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file} is not a readable safetensors file: {exc}") from exc
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} not found")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def _byte_level(spec: dict[str, Any]) -> bool:
    """True when the tokenizer maps bytes to GPT-2's printable alphabet (its decoder says)."""
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" \
        else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _token_id(token: Any, ids: dict[str, int], fallback: Any) -> int | None:
    """A tokenizer_config token (a string or {"content": ...}) as an id, else config's id."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in ids:
        return ids[token]
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return int(fallback) if fallback is not None else None


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _generation_eos(folder: Path) -> tuple[int, ...]:
    eos = _json(folder / "generation_config.json", required=False).get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(i) for i in eos) if isinstance(eos, list) else ()
