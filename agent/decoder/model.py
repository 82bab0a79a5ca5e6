"""The decoder: one readable file for the Llama / Qwen2 family (gpt-fast style).

GQA attention with RoPE in the Hugging Face "rotate half" layout, RMSNorm, SwiGLU. The
linears are plain `nn.Linear` (`wqkv`, `wo`, `w13`, `w2`, `output`) so that the NF4
module-swap in `quantize.py` can replace them from outside; q/k/v and gate/up are fused so
a layer makes four matmul calls, not seven.

KV cache: `KVCache` is a pool of stream slots per model, k and v each
[n_layer, n_slots, n_kv_head, max_seq_len, head_dim]. A stream owns one slot; every forward
names the slot and the start position of each row, so streams at different positions share
one batched decode step. Why a pool and not per-stream tensors gathered each step: the
decode attention then reads each stream's keys in place through one strided view
`k[layer, lo:hi, :, :t_max]` (rows between lo and hi that are not in the batch get a
dummy query and are masked; rows shorter than t_max are masked past their position),
where gathering copies every active stream's cache on every layer of every step (measured
here, 8 streams at 300 tokens: 82 ms of attention per step gathered, 49 ms in place).
Memory is committed lazily: the pool is `torch.empty`, and the positions a step is about
to read are zeroed the first time (`_clean`), so masked, never-written entries can not
carry NaNs into the softmax. K/V are float32: 46,080 bytes per token for SmolLM2-135M,
24,576 for Qwen2.5-0.5B (`KVCache.bytes_per_token`).

With the CPU kernels, the attention of a decode step or of a one-slot prompt chunk is one
call per layer instead (`Transformer.token_attention`, kernels/csrc/attention.h: the same
maths on the same cache, one row per new token), and with NF4 linears the whole block is
(`TransformerBlock.kernel_forward`); the PyTorch ops here serve the other backends.

A forward takes explicit positions (`start` per row) and sets `cache.lengths[slot]` to the
end of what it wrote, so cutting a stream back is `cache.truncate(slot, n)`: attention never
reads past a row's own position.

The model runs where its RoPE tables are (`Transformer.device`): caches and index tensors
are made there. On CUDA (the triton backend) a decode step can also be built from device
tensors alone (`Step.kernel_rows`), which is what cuda_graphs.py captures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agent.errors import ConfigError, InvalidRequestError

# Per-architecture facts GGUF metadata does not spell out.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
}


@dataclass
class ModelArgs:
    arch: str = "llama"
    n_layer: int = 30
    dim: int = 576
    n_head: int = 9
    n_kv_head: int = 3
    intermediate_size: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # linear position scaling (positions / rope_scale)
    context_length: int = 8192
    head_dim: int = 0  # derived from dim // n_head when 0
    qkv_bias: bool = False
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"{self.n_head} heads do not group over {self.n_kv_head} KV heads")

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: set[str]) -> ModelArgs:
        arch = str(metadata.get("general.architecture", ""))
        if arch not in ARCH_PRESETS:
            known = ", ".join(ARCH_PRESETS)
            raise ConfigError(f"unsupported architecture {arch!r}; known: {known}")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{name}")
            return value

        scaling = key("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ConfigError(f"RoPE scaling {scaling!r} is not supported")
        n_head = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        vocab = len(metadata.get("tokenizer.ggml.tokens", ())) or int(key("vocab_size"))
        return cls(
            arch=arch, n_layer=int(key("block_count")), dim=dim, n_head=n_head,
            n_kv_head=int(key("attention.head_count_kv", n_head)),
            intermediate_size=int(key("feed_forward_length")), vocab_size=vocab,
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scale=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            context_length=int(key("context_length")),
            head_dim=int(key("attention.key_length", dim // n_head)),
            tied_embeddings="output.weight" not in tensor_names,
            **ARCH_PRESETS[arch],
        )


class KVCache:
    """A pool of per-stream slots: k, v [n_layer, n_slots, n_kv_head, max_seq_len, head_dim].

    `lengths[slot]` is how many positions of the slot hold accepted tokens; cutting it back
    (`truncate`) is all a rollback needs, since attention never reads past a row's position.
    """

    def __init__(self, args: ModelArgs, n_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (args.n_layer, n_slots, args.n_kv_head, max_seq_len, args.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.lengths = [0] * n_slots
        self._clean = [0] * n_slots  # positions below this are written or zeroed

    @property
    def bytes_per_token(self) -> int:
        n_layer, _, n_kv, _, hd = self.k.shape
        return 2 * n_layer * n_kv * hd * self.k.element_size()

    @property
    def bytes_per_stream(self) -> int:
        return self.bytes_per_token * self.max_seq_len

    def truncate(self, slot: int, n_tokens: int) -> None:
        self.lengths[slot] = max(0, min(n_tokens, self.lengths[slot]))

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def copy_prefix(self, src: int, dst: int, start: int, end: int) -> None:
        """Positions start..end-1 of slot `src` into slot `dst`, which then holds `end`.

        Keys and values at a position depend only on the tokens up to it, so a prefix
        shared by two prompts (instructions, tool descriptions) need be computed once."""
        self.k[:, dst, :, start:end].copy_(self.k[:, src, :, start:end])
        self.v[:, dst, :, start:end].copy_(self.v[:, src, :, start:end])
        self.lengths[dst] = end
        self._clean[dst] = max(self._clean[dst], end)

    def written(self, slots: list[int], end: list[int]) -> None:
        """Positions below end[i] of slots[i] hold keys and values once the kernel path's
        step has written the new ones (the rest were written before), so `ensure_clean`
        must leave them alone."""
        for s, e in zip(slots, end, strict=True):
            self._clean[s] = max(self._clean[s], e)

    def ensure_clean(self, slots: range | list[int], upto: int) -> None:
        """Zero never-written positions below `upto` in `slots` (done once per position)."""
        for s in slots:
            if self._clean[s] < upto:
                self.k[:, s, :, self._clean[s]:upto].zero_()
                self.v[:, s, :, self._clean[s]:upto].zero_()
                self._clean[s] = upto

    def update(self, layer: int, step: Step, k: Tensor, v: Tensor) -> None:
        """Store k, v [B * T, n_kv_head, head_dim] at each row's slot and positions."""
        if step.write_k is not None and step.write_v is not None:  # one row: strided copies
            step.write_k[layer].copy_(k.transpose(0, 1))  # [Hkv, T, D]
            step.write_v[layer].copy_(v.transpose(0, 1))
        else:
            rows = (len(step.slots), step.n_tokens)
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
            self.k[layer].index_put_(step.write_index, k.unflatten(0, rows))  # [B, T, Hkv, D]
            self.v[layer].index_put_(step.write_index, v.unflatten(0, rows))


class Step:
    """What every layer of one forward shares: RoPE, cache views and indices, masks.

    Built once per forward so that a layer does as few tensor calls as possible; at this
    model size Python dispatch, not arithmetic, is what a decode step mostly spends.
    Index tensors live where the cache does.
    """

    fused: Callable[..., Tensor] | None

    def __init__(self, model: Transformer, cache: KVCache, slots: list[int], start: list[int],
                 n_tokens: int):
        end = check_rows(model, cache, slots, start, n_tokens)
        self.slots, self.start, self.n_tokens = slots, start, n_tokens
        dev = cache.k.device
        # The kernel path: one row per new token, each with its slot and position (a
        # decode step, or one slot's prompt chunk, causal by position, where the kernel
        # takes prompt chunks).
        kernel_rows = n_tokens == 1 or (len(slots) == 1 and model.token_attention_prefill)
        self.fused = model.token_attention if kernel_rows else None
        if self.fused is not None:  # the kernel reads slots, positions and tables itself
            self.slot_ids = torch.tensor(slots, device=dev).repeat_interleave(n_tokens)
            self.positions = (torch.tensor(start, device=dev)[:, None]
                              + torch.arange(n_tokens, device=dev)).flatten()
            self.tables = (model.rope_cos, model.rope_sin)
            cache.written(slots, end)  # it reads only positions it has written
            return
        positions = (torch.tensor(start, device=dev)[:, None]
                     + torch.arange(n_tokens, device=dev))  # [B, T]
        flat = positions.flatten()
        cos, sin = model.rope_cos[flat], model.rope_sin[flat]  # [B*T, D/2]
        # Few rows (decode): one small matmul per layer; many rows (prefill): elementwise.
        self.rope = rope_matrices(cos, sin) if len(flat) <= 16 else None  # [B*T, D, D]
        self.cos, self.sin = cos[:, None], sin[:, None]  # [B*T, 1, D/2]
        self.write_k: Tensor | None = None
        self.write_v: Tensor | None = None
        if len(slots) == 1:  # views of this row's new positions in every layer
            s, p = slots[0], start[0]
            self.write_k = cache.k[:, s, :, p:p + n_tokens]  # [L, Hkv, T, D]
            self.write_v = cache.v[:, s, :, p:p + n_tokens]
        else:  # index_put_ at (slot, head, position), broadcast to [B, T, Hkv]
            self.write_index = (torch.tensor(slots, device=dev)[:, None, None],
                                torch.arange(model.args.n_kv_head, device=dev)[None, None, :],
                                positions[:, :, None])
        if n_tokens == 1:
            self._setup_decode(cache, end)
        else:  # prefill: per row, causal over its cached prefix + the new tokens
            cache.ensure_clean(self.slots, max(end))
            self.masks = [None if p == 0 else _causal_mask(p, e, dev)
                          for p, e in zip(self.start, end, strict=True)]

    @classmethod
    def kernel_rows(cls, model: Transformer, slot_ids: Tensor, positions: Tensor) -> Step:
        """A decode step read from device tensors, one row per stream (a negative position
        is a padding row): what a CUDA graph captures, since no host value shapes it. The
        caller keeps the cache's bookkeeping (`KVCache.written`, `lengths`)."""
        if model.token_attention is None:
            raise ConfigError("a step from device tensors needs the token attention kernel")
        step = cls.__new__(cls)
        step.slots, step.start, step.n_tokens = [], [], 1
        step.fused = model.token_attention
        step.slot_ids, step.positions = slot_ids, positions
        step.tables = (model.rope_cos, model.rope_sin)
        return step

    def _setup_decode(self, cache: KVCache, end: list[int]) -> None:
        """Batched decode reads slots lo..hi in place; rows not in the batch are masked."""
        self.lo, self.hi = min(self.slots), max(self.slots) + 1
        t_max = max(end)
        rows = self.hi - self.lo
        dev = cache.k.device
        self.dense = rows == len(self.slots) and self.slots == sorted(self.slots)
        self.row_of = torch.tensor(self.slots, device=dev) - self.lo
        cache.ensure_clean(range(self.lo, self.hi), t_max)
        self.read_k = cache.k[:, self.lo:self.hi, :, :t_max]  # [L, R, Hkv, t_max, D]
        self.read_v = cache.v[:, self.lo:self.hi, :, :t_max]
        self.mask: Tensor | None = None
        if not (self.dense and min(end) == t_max):
            limit = torch.ones(rows, dtype=torch.long, device=dev)  # idle rows: position 0
            limit[self.row_of] = torch.tensor(end, device=dev)
            self.mask = (torch.arange(t_max, device=dev) < limit[:, None])[:, None, None, :]


def check_rows(model: Transformer, cache: KVCache, slots: list[int], start: list[int],
               n_tokens: int) -> list[int]:
    """Each row's end position, after checking the rows fit: distinct slots, in context."""
    if len(slots) != len(start) or len(set(slots)) != len(slots):
        raise ValueError("one distinct slot per row is required")
    end = [p + n_tokens for p in start]
    if max(end) > min(cache.max_seq_len, model.rope_cos.shape[0]):
        raise InvalidRequestError(
            f"context full: position {max(end)} exceeds {cache.max_seq_len}")
    return end


def _causal_mask(start: int, end: int, device: torch.device) -> Tensor:
    """Additive mask [T, end] for queries at start..end-1 over keys 0..end-1."""
    allowed = (torch.arange(end, device=device)[None, :]
               <= torch.arange(start, end, device=device)[:, None])
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by each row's angle. x [N, H, D], cos/sin [N, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_matrices(cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as one matrix per position, for row vectors: x @ R rotates each pair
    (x[i], x[i + d/2]) by its angle. cos, sin: [N, D/2] -> R: [N, D, D].

    One batched matmul per layer then replaces the eight elementwise calls of the usual
    rotate-half formula; the zeros it multiplies cost nothing next to a dispatch.
    """
    c, s = torch.diag_embed(cos), torch.diag_embed(sin)  # [N, D/2, D/2]
    top = torch.cat([c, s], dim=-1)  # x[:d/2] feeds  y[:d/2] * cos and y[d/2:] * sin
    bottom = torch.cat([-s, c], dim=-1)  # x[d/2:] feeds y[:d/2] * -sin and y[d/2:] * cos
    return torch.cat([top, bottom], dim=-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        qkv_out = (args.n_head + 2 * args.n_kv_head) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, step: Step, cache: KVCache) -> Tensor:
        bsz, seqlen, _ = x.shape
        h, hkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x)
        if step.fused is not None:
            y = step.fused(qkv, cache.k, cache.v, self.layer, step.slot_ids, step.positions,
                           *step.tables, h, hkv)  # [B*T, H*D]
            return self.wo(y.view(bsz, seqlen, -1))
        qkv = qkv.view(bsz * seqlen, h + 2 * hkv, self.head_dim)  # [N, H+2Hkv, D]
        qk = qkv[:, :h + hkv]  # RoPE on the q and k heads at once
        if step.rope is not None:
            qk = torch.matmul(qk, step.rope)
        else:
            qk = apply_rope(qk, step.cos, step.sin)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv:]  # [N, H, D], [N, Hkv, D] x2
        cache.update(self.layer, step, k, v)
        if seqlen == 1:
            y = self._decode_attention(q, step)
        else:
            y = self._prefill_attention(q, step, cache)
        return self.wo(y)  # [B, T, dim]

    def _decode_attention(self, q: Tensor, step: Step) -> Tensor:
        bsz = q.shape[0]
        # Query heads sharing a KV head become that head's "sequence": no KV repeat needed.
        q = q.unflatten(1, (self.n_kv_head, self.n_head // self.n_kv_head))  # [B, Hkv, G, D]
        if not step.dense:
            rows = q.new_zeros(step.hi - step.lo, *q.shape[1:])
            q = rows.index_copy_(0, step.row_of, q)  # [R, Hkv, G, D]
        k, v = step.read_k[self.layer], step.read_v[self.layer]  # [R, Hkv, t_max, D]
        k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache (the kernel backends')
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask)  # [R, Hkv, G, D]
        if not step.dense:
            y = y.index_select(0, step.row_of)
        return y.view(bsz, 1, self.n_head * self.head_dim)

    def _prefill_attention(self, q: Tensor, step: Step, cache: KVCache) -> Tensor:
        seqlen = step.n_tokens
        out = []
        for row, (slot, mask) in enumerate(zip(step.slots, step.masks, strict=True)):
            end = step.start[row] + seqlen
            k = cache.k[self.layer, slot:slot + 1, :, :end].to(q.dtype)  # [1, Hkv, end, D]
            v = cache.v[self.layer, slot:slot + 1, :, :end].to(q.dtype)
            qr = q[row * seqlen:(row + 1) * seqlen].transpose(0, 1)[None]  # [1, H, T, D]
            y = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True)
            out.append(y[0].transpose(0, 1))  # [T, H, D]
        y = torch.cat(out) if len(out) > 1 else out[0]  # [B*T, H, D]
        return y.reshape(len(step.slots), seqlen, self.n_head * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        # A kernel backend's whole block in one call (quantize.py sets it): the same
        # kernels as the modules below, without their Python overhead.
        self.kernel_forward: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor, step: Step, cache: KVCache) -> Tensor:
        if step.fused is not None and self.kernel_forward is not None:
            a = self.attention
            return self.kernel_forward(x, cache.k, cache.v, a.layer, step.slot_ids,
                                       step.positions, *step.tables, a.n_head, a.n_kv_head)
        x = x + self.attention(self.attention_norm(x), step, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # A kernel backend's one-call attention for new tokens (quantize.py sets it; see
        # kernels/__init__.py), else the PyTorch ops below; whether it also takes prompt
        # chunks (the CPU's does; on CUDA PyTorch's flash attention does them better).
        self.token_attention: Callable[..., Tensor] | None = None
        self.token_attention_prefill = True
        # What new caches store keys and values as; float16 where that attention kernel
        # runs (half the memory per stream, half the bytes read per key).
        self.cache_dtype = torch.float32

    def setup_rope(self, freq_factors: Tensor | None = None) -> None:
        """cos/sin tables [context_length, head_dim / 2] (float64 math, stored float32)."""
        a = self.args
        exponents = torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim
        inv_freq = 1.0 / (a.rope_theta ** exponents)  # [D/2]
        if freq_factors is not None:  # llama3-style per-frequency scaling (rope_freqs)
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        positions = torch.arange(a.context_length, dtype=torch.float64) / a.rope_scale
        angles = torch.outer(positions, inv_freq)  # [ctx, D/2]
        self.rope_cos = angles.cos().float()
        self.rope_sin = angles.sin().float()

    @property
    def device(self) -> torch.device:
        """Where the model runs (its RoPE tables, embeddings and caches live there)."""
        return self.rope_cos.device

    def new_cache(self, n_slots: int, max_seq_len: int | None = None) -> KVCache:
        length = min(max_seq_len or self.args.context_length, self.args.context_length)
        return KVCache(self.args, n_slots, length, self.cache_dtype, self.device)

    def forward(self, tokens: Tensor, cache: KVCache, slots: list[int], start: list[int],
                *, all_logits: bool = False) -> Tensor:
        """tokens [B, T] at positions start[b].. of cache slot slots[b].

        Returns logits [B, vocab] for each row's last token, or [B, T, vocab] with
        `all_logits`. Afterwards `cache.lengths[slot] = start + T` for every row.
        """
        step = Step(self, cache, slots, start, tokens.shape[1])
        logits = self.run_step(tokens.to(self.device), step, cache, all_logits=all_logits)
        for slot, p in zip(slots, start, strict=True):
            cache.lengths[slot] = p + tokens.shape[1]
        return logits

    def run_step(self, tokens: Tensor, step: Step, cache: KVCache, *,
                 all_logits: bool = False) -> Tensor:
        """The layers over tokens [B, T] on the model's device, as `step` places them."""
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            x = layer(x, step, cache)
        if not all_logits:
            x = x[:, -1]  # [B, dim]
        return self.output(self.norm(x))


# GGUF tensor names of the matrices that become this model's nn.Linear weights/biases.
LINEAR_TENSORS = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.",
                  "ffn_down.")


def is_linear_tensor(name: str) -> bool:
    """True for GGUF tensors that only feed nn.Linear modules (skippable with an NF4 cache)."""
    return name == "output.weight" or (name.startswith("blk.") and
                                       name.split(".", 2)[2].startswith(LINEAR_TENSORS))


def _fuse(tensors: dict[str, Tensor], names: list[str]) -> Tensor | None:
    """torch.cat of the named tensors (consumed), or None when any is absent."""
    if not all(n in tensors for n in names):
        return None
    return torch.cat([tensors.pop(n) for n in names], dim=0)


def _layer_state(args: ModelArgs, tensors: dict[str, Tensor], i: int) -> dict[str, Tensor | None]:
    p, b = f"layers.{i}.", f"blk.{i}."
    state = {
        p + "attention_norm.weight": tensors.pop(b + "attn_norm.weight"),
        p + "ffn_norm.weight": tensors.pop(b + "ffn_norm.weight"),
        p + "attention.wqkv.weight": _fuse(tensors, [b + f"attn_{x}.weight" for x in "qkv"]),
        p + "attention.wo.weight": tensors.pop(b + "attn_output.weight", None),
        p + "feed_forward.w13.weight": _fuse(tensors, [b + "ffn_gate.weight",
                                                       b + "ffn_up.weight"]),
        p + "feed_forward.w2.weight": tensors.pop(b + "ffn_down.weight", None),
    }
    if args.qkv_bias:
        state[p + "attention.wqkv.bias"] = _fuse(tensors, [b + f"attn_{x}.bias" for x in "qkv"])
    return state


def build_model(args: ModelArgs, tensors: dict[str, Tensor]) -> Transformer:
    """A Transformer holding the GGUF's float32 tensors (consumed from `tensors`).

    Linear weights absent from `tensors` stay on the meta device: that is how a model is
    built when its NF4 weights come from the on-disk cache (quantize.py fills them in).
    Anything else missing is an error.
    """
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state: dict[str, Tensor | None] = {
            "tok_embeddings.weight": tensors.pop("token_embd.weight"),
            "norm.weight": tensors.pop("output_norm.weight"),
        }
        for i in range(args.n_layer):
            state.update(_layer_state(args, tensors, i))
    except KeyError as exc:
        raise ConfigError(f"the GGUF file lacks tensor {exc}") from None
    if not args.tied_embeddings:
        state["output.weight"] = tensors.pop("output.weight", None)
    model.load_state_dict({k: v for k, v in state.items() if v is not None},
                          strict=False, assign=True)
    if args.tied_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.setup_rope(tensors.pop("rope_freqs.weight", None))
    return model.eval()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def describe(args: ModelArgs) -> str:
    params = args.n_layer * (args.dim * (args.n_head + 2 * args.n_kv_head) * args.head_dim
                             + args.n_head * args.head_dim * args.dim
                             + 3 * args.dim * args.intermediate_size)
    params += args.vocab_size * args.dim * (1 if args.tied_embeddings else 2)
    return (f"{args.arch}: {args.n_layer} layers, dim {args.dim}, {args.n_head}/{args.n_kv_head} "
            f"heads, vocab {args.vocab_size}, ~{params / 1e6:.0f}M parameters, "
            f"rope theta {args.rope_theta:g}, context {args.context_length}; "
            f"{math.prod((2, args.n_layer, args.n_kv_head, args.head_dim)) * 4} B of KV per token")
