"""Tiny random-weight GGUF files of the bundled models' architectures, for running the
whole decoder through the Triton kernels in Triton's interpreter (too slow for a real
model there).

They carry the head of SmolLM2's own tokenizer: its first 512 tokens (the special ones,
the 256 bytes, the first merges) with the merges among them and its chat template, so
prompts, chat messages and streamed text go through the real tokenizer code; a 49152-row
head would cost the interpreter half a second a step. Only the weights are random, in the
block types the bundled file uses (Q4_1 linears, a Q8_0 embedding) or in float32 (which
the engine quantises to NF4, with its 8-bit head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from agent.decoder.gguf_loader import read_header
from agent.decoder.model import ModelArgs
from agent.decoder.random_model import random_tensors, tiny_args

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                  "tokenizer.chat_template")


def write_tiny_gguf(path: Path, tokenizer_from: Path, *, linear_type: str = "Q4_1",
                    arch: str = "llama", seed: int = 0, vocab_size: int = 512) -> ModelArgs:
    """A two-layer model of `arch` at `path`, with the first `vocab_size` tokens of the
    GGUF `tokenizer_from`'s tokenizer; linears in `linear_type` ("Q4_1", "Q8_0" or "F32"),
    the embedding in Q8_0 unless F32. Returns its shape."""
    meta, _ = read_header(tokenizer_from)
    meta = _first_tokens(meta, vocab_size)
    args = tiny_args(arch, vocab_size=vocab_size)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(args.n_layer)
    writer.add_context_length(args.context_length)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.n_head)
    writer.add_head_count_kv(args.n_kv_head)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    for key in TOKENIZER_KEYS:
        if key in meta:
            _copy(writer, key, meta[key])
    embed_type = "F32" if linear_type == "F32" else "Q8_0"
    for name, tensor in random_tensors(args, seed).items():
        kind = (embed_type if name == "token_embd.weight" else
                linear_type if tensor.dim() == 2 else "F32")
        values = tensor.numpy().astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quantize(values, Q[kind]), raw_dtype=Q[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return args


def _first_tokens(meta: dict, n: int) -> dict:
    """The tokenizer metadata cut to its first n tokens and the merges among them."""
    tokens = list(meta["tokenizer.ggml.tokens"])[:n]
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"]
              if (parts := m.split(" ", 1)) and all(p in kept for p in parts)
              and "".join(parts) in kept]
    return {**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": list(meta["tokenizer.ggml.token_type"])[:n]}


def _copy(writer: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))  # type: ignore[call-overload]
