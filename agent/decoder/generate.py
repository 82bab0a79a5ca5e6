"""Generation as a ladder of small steps (gpt-fast style), plus per-stream text output.

    prefill      run a prompt (in chunks) into a cache slot, return the last logits
    decode_one   one token for each of several streams, batched in one forward
    TextStream   token ids -> text deltas: UTF-8 safe, stop strings, EOS, max tokens
    generate     the synchronous single-stream loop (`parley generate`, tests)

The scheduler drives the same steps for many concurrent streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from agent.decoder.model import KVCache, Transformer
from agent.decoder.sampling import Sampler, SamplingParams, StopMatcher
from agent.decoder.tokenizer import Tokenizer
from agent.errors import InvalidRequestError

DEFAULT_PREFILL_CHUNK = 128


def prefill(model: Transformer, cache: KVCache, slot: int, ids: Sequence[int], start: int = 0,
            chunk: int = DEFAULT_PREFILL_CHUNK) -> Tensor:
    """Write ids at positions start.. of `slot`; logits [vocab] after the last one."""
    if not ids:
        raise ValueError("prefill needs at least one token")
    logits = None
    for i in range(0, len(ids), chunk):
        piece = torch.tensor([list(ids[i:i + chunk])])  # [1, T]
        logits = model(piece, cache, [slot], [start + i])
    return logits[0]  # type: ignore[index]


def decode_one(model: Transformer, cache: KVCache, tokens: Sequence[int], slots: Sequence[int],
               positions: Sequence[int]) -> Tensor:
    """Feed one token per stream (at its position in its slot); logits [B, vocab]."""
    batch = torch.tensor(list(tokens))[:, None]  # [B, 1]
    return model(batch, cache, list(slots), list(positions))


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the session's cache
    completion_tokens: int = 0


@dataclass
class Delta:
    """A piece of a stream: new text, the tokens it came from, and at the end why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    usage: Usage | None = None  # on the last delta


class TextStream:
    """One stream's output state: generated ids, incremental UTF-8, stop strings."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.params = params
        self.generated: list[int] = []
        self._decoder = tokenizer.stream_decoder()
        self._stops = StopMatcher(params.stop)
        self._eog = tokenizer.eog_ids

    def accept(self, token: int) -> tuple[str, str | None]:
        """Take one sampled token; returns (text to emit, finish reason or None)."""
        self.generated.append(token)
        if token in self._eog:
            return self.finish(), "stop"
        text, stopped = self._stops.push(self._decoder.feed(token))
        if stopped:
            return text, "stop"
        if len(self.generated) >= self.params.max_tokens:
            return text + self.finish(), "length"
        return text, None

    def finish(self) -> str:
        """Whatever is held back when the stream ends without a stop string."""
        tail, stopped = self._stops.push(self._decoder.flush())
        return tail if stopped else tail + self._stops.flush()[0]


def generate(model: Transformer, tokenizer: Tokenizer, prompt: Sequence[int],
             params: SamplingParams, *, cache: KVCache | None = None, slot: int = 0,
             chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[Delta]:
    """Stream deltas for one prompt (cache slot reset first). Synchronous; no batching."""
    cache = cache if cache is not None else model.new_cache(1, len(prompt) + params.max_tokens)
    if len(prompt) >= cache.max_seq_len:
        raise InvalidRequestError(f"prompt of {len(prompt)} tokens does not fit the "
                                  f"{cache.max_seq_len}-token context")
    cache.reset(slot)
    sampler, stream = Sampler(params), TextStream(tokenizer, params)
    with torch.inference_mode():
        logits = prefill(model, cache, slot, prompt, chunk=chunk)
        while True:
            token = sampler(logits, stream.generated)
            text, finish = stream.accept(token)
            if finish is None and cache.lengths[slot] >= cache.max_seq_len:
                text, finish = text + stream.finish(), "length"
            usage = Usage(len(prompt), 0, len(stream.generated)) if finish else None
            yield Delta(text, [token], finish, usage)
            if finish:
                return
            logits = decode_one(model, cache, [token], [slot], [cache.lengths[slot]])[0]
