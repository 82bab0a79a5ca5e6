"""Random weights of a real architecture, for tests and benchmarks where no model file can
go (the GPU machine reaches no registry; CI's tiny models).

Scaled so that activations stay of order one through the layers, as a trained model's do:
linear weights N(0, 1/K), embeddings N(0, 1), norm weights near one. Named as a GGUF
names them (model.build_model takes them as they are).
"""

from __future__ import annotations

import torch
from torch import Tensor

from agent.decoder.model import ModelArgs

# Llama-3-8B's shapes (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_8B = ModelArgs(arch="llama", n_layer=32, dim=4096, n_head=32, n_kv_head=8,
                      intermediate_size=14336, vocab_size=128256, norm_eps=1e-5,
                      rope_theta=500000.0, context_length=8192, tied_embeddings=False)


def tiny_args(arch: str = "llama", vocab_size: int = 512) -> ModelArgs:
    """Two layers of ragged sizes: a width that is no multiple of 64, a head of 24, grouped
    query heads, a feed-forward width of five 32-blocks. The head is its own matrix: a
    random model with a tied one repeats a single token, greedy."""
    return ModelArgs(arch=arch, n_layer=2, dim=96, n_head=4, n_kv_head=2,
                     intermediate_size=160, vocab_size=vocab_size, rope_theta=10000.0,
                     context_length=1024, qkv_bias=arch == "qwen2", tied_embeddings=False)


def random_tensors(args: ModelArgs, seed: int = 0) -> dict[str, Tensor]:
    """Float32 tensors under GGUF names for every weight of `args`."""
    gen = torch.Generator().manual_seed(seed)

    def linear(n: int, k: int) -> Tensor:
        return torch.randn(n, k, generator=gen) / k ** 0.5

    def norm(n: int) -> Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    d, hd = args.dim, args.head_dim
    out = {"token_embd.weight": torch.randn(args.vocab_size, d, generator=gen),
           "output_norm.weight": norm(d)}
    if not args.tied_embeddings:
        out["output.weight"] = linear(args.vocab_size, d)
    for i in range(args.n_layer):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": norm(d), b + "ffn_norm.weight": norm(d),
                b + "attn_q.weight": linear(args.n_head * hd, d),
                b + "attn_k.weight": linear(args.n_kv_head * hd, d),
                b + "attn_v.weight": linear(args.n_kv_head * hd, d),
                b + "attn_output.weight": linear(d, args.n_head * hd),
                b + "ffn_gate.weight": linear(args.intermediate_size, d),
                b + "ffn_up.weight": linear(args.intermediate_size, d),
                b + "ffn_down.weight": linear(d, args.intermediate_size)}
        if args.qkv_bias:
            for x, n in (("q", args.n_head), ("k", args.n_kv_head), ("v", args.n_kv_head)):
                out[b + f"attn_{x}.bias"] = 0.1 * torch.randn(n * hd, generator=gen)
    return out
