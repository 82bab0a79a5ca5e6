"""Write a bundled GGUF out as a Hugging Face checkpoint folder, laid out as HF ships one.

No registry package carries a 16-bit Llama/Qwen2 checkpoint (MODELS.md), so the tests
make one from the bundled files: the GGUF's weights dequantised (Q/K rows back in HF's
rotate-half order), stored in the dtype asked for under HF's tensor names, with
config.json, tokenizer.json (HF's own pre-tokenizer for the family, not Parley's regex
table), tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from agent.decoder.gguf_loader import load_gguf
from agent.decoder.hf_loader import GLOBAL_TENSORS, LAYER_TENSORS
from agent.decoder.model import ModelArgs
from agent.decoder.tokenizer import CONTROL, PRE_TOKENIZERS, UNUSED, USER_DEFINED

[_QWEN2_SPLIT] = PRE_TOKENIZERS["qwen2"]  # the regex Qwen2's tokenizer.json splits with

_HF_NAMES = {gguf: hf for hf, gguf in (GLOBAL_TENSORS | LAYER_TENSORS).items()}


def hf_name(name: str) -> str:
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_HF_NAMES[rest]}"


def write_checkpoint(gguf: Path, folder: Path, dtype: torch.dtype, *, shards: int = 1,
                     weights: bool = True) -> Path:
    """The folder, with the weights in `shards` files (none with `weights=False`: the
    config and tokenizer files only)."""
    from safetensors.torch import save_file

    ckpt = load_gguf(gguf, skip=None if weights else lambda name: True)
    meta = ckpt.metadata
    args = ModelArgs.from_gguf(meta, set(ckpt.tensor_types))
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(folder, args, meta, dtype)
    _write_tokenizer(folder, meta)
    if not weights:
        return folder
    tensors = {hf_name(n): t.to(dtype).contiguous() for n, t in ckpt.tensors.items()}
    if args.tied_embeddings:  # some exporters write the tied head too; the loader drops it
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    names = sorted(tensors)
    for i in range(shards):
        save_file({n: tensors[n] for n in names[i::shards]},
                  str(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


def _write_config(folder: Path, args: ModelArgs, meta: dict, dtype: torch.dtype) -> None:
    config = {
        "architectures": ["LlamaForCausalLM" if args.arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": args.arch, "hidden_act": "silu", "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size, "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head, "num_key_value_heads": args.n_kv_head,
        "max_position_embeddings": args.context_length, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": args.tied_embeddings, "vocab_size": args.vocab_size,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _write_tokenizer(folder: Path, meta: dict) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty != UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if meta["tokenizer.ggml.pre"] == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # SmolLM2 ships single digits, then GPT-2's byte-level regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])
    tok.save(str(folder / "tokenizer.json"))
    eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    settings = {"bos_token": tokens[bos_id] if meta["tokenizer.ggml.pre"] != "qwen2" else None,
                "eos_token": eos, "add_bos_token": False,
                "chat_template": meta.get("tokenizer.chat_template")}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [meta["tokenizer.ggml.eos_token_id"]]}))
