"""Decode steps: eager, or replayed from CUDA graphs captured once per batch-size bucket.

A decode step of a small model on a GPU is hundreds of kernel launches of microseconds
each; launching them from Python costs more than running them. A CUDA graph records the
launches of one step once and replays them with one call. What makes a step capturable is
that no host value shapes it: the token ids, slots and positions sit in static device
buffers (`Step.kernel_rows`), the token attention kernel reads them there, and a batch
smaller than its bucket is padded with rows at position -1, which the kernel skips.

    decode = DecodeRunner(model, cache)
    logits = decode(tokens, slots, positions)   # [B, vocab]; cache.lengths updated

Graphs are used on CUDA with the token attention kernel (the triton backend); everywhere
else the step runs eagerly through `Transformer.forward`. `static=True` runs the graphs'
own path (the buffers, the padding, the bookkeeping) eagerly without capturing it, which
is how the tests check it without a GPU. Batches above the largest bucket run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from agent.decoder.model import KVCache, Step, Transformer, check_rows

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)


class _StaticStep:
    """One bucket's buffers, and the step over them: captured, or run as it is."""

    def __init__(self, model: Transformer, cache: KVCache, rows: int, capture: bool,
                 pool: Any | None):
        dev = model.device
        self.model, self.cache, self.rows = model, cache, rows
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.host = torch.zeros(3, rows, dtype=torch.long,
                                pin_memory=dev.type == "cuda")
        self.step = Step.kernel_rows(model, self.slots, self.positions)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if capture:
            self._capture(pool)

    def _capture(self, pool: Any | None) -> None:
        # Warm-up off the capturing stream first: Triton tunes and compiles each kernel on
        # its first call, which a capture must not contain. All rows are padding here, so
        # no cache position is written.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.run_step(self.tokens, self.step, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other engines (Whisper, Piper) may use the device
        # from their own threads while the decoder's worker captures.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self.model.run_step(self.tokens, self.step, self.cache)

    def run(self, tokens: Sequence[int], slots: Sequence[int],
            positions: Sequence[int]) -> Tensor:
        n = len(tokens)
        host = self.host
        host[0, :n] = torch.tensor(tokens)
        host[1, :n] = torch.tensor(slots)
        host[2, :n] = torch.tensor(positions)
        host[0, n:], host[1, n:], host[2, n:] = 0, 0, -1
        self.tokens[:, 0].copy_(host[0], non_blocking=True)
        self.slots.copy_(host[1], non_blocking=True)
        self.positions.copy_(host[2], non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits[:n]
        return self.model.run_step(self.tokens, self.step, self.cache)[:n]


class DecodeRunner:
    """One decode step of the model over `cache`; see the module docstring."""

    def __init__(self, model: Transformer, cache: KVCache, *, graphs: bool | None = None,
                 static: bool = False):
        kernel = model.token_attention is not None
        on_cuda = model.device.type == "cuda"
        self.model, self.cache = model, cache
        self.graphs = (on_cuda and kernel) if graphs is None else graphs
        self.static = self.graphs or (static and kernel)
        self._steps: dict[int, _StaticStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def __call__(self, tokens: Sequence[int], slots: list[int],
                 positions: list[int]) -> Tensor:
        bucket = next((b for b in BUCKETS if b >= len(tokens)), None)
        if not self.static or bucket is None:
            return self.model(torch.tensor(tokens)[:, None], self.cache, slots, positions)
        end = check_rows(self.model, self.cache, slots, positions, 1)
        step = self._steps.get(bucket)
        if step is None:
            if self.graphs:
                log.info("capturing the decode step for %d rows in a CUDA graph", bucket)
            step = self._steps[bucket] = _StaticStep(self.model, self.cache, bucket,
                                                     self.graphs, self._pool)
        logits = step.run(tokens, slots, positions)
        self.cache.written(slots, end)
        for slot, e in zip(slots, end, strict=True):
            self.cache.lengths[slot] = e
        return logits
