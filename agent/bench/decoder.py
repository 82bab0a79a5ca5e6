"""`parley bench decoder`: Parley's decoder side by side with llama.cpp, in one run.

Implementations, all loaded in this process and measured in interleaved rounds (one after
the other within a round, never concurrently):
    PyTorch fp32   the dequantised GGUF weights in plain nn.Linear (the ground truth)
    Parley         the default configuration (backend "auto", llm_weights "auto": the
                   file's own quantised blocks for a quantised GGUF, llm_activations
                   "int8x2"), then those weights with int8 activations (llama.cpp's
                   rounding) and NF4 on the same backend, so the cost of each shows
    llama.cpp      llama-cpp-python on the same GGUF, when installed (a bench-only extra)

Measured with greedy argmax sampling outside the timed engine calls, so every row times
the engine, not a sampler:
    decode tok/s at batch 1, 4 and 8 (aggregate over the streams of one batched step;
    llama.cpp runs one stream, so its batch-1 rate is the comparison for all three),
    prefill tok/s of a 300-token prompt, time to first token of a short chat prompt,
    weight memory and KV-cache memory per stream.
The table is Markdown, for the README.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from agent.config import Settings

PREFILL_TOKENS = 300
BATCHES = (1, 4, 8)
CHAT_PROMPT = "What is the capital of France? Answer in one short sentence."
FILLER = ("The history of the bicycle begins in the early nineteenth century, when inventors "
          "in Europe experimented with two-wheeled machines pushed along by the rider's feet. ")


@dataclass
class Row:
    name: str
    weights: str  # what the linears run in (as /healthz says it) x what they multiply
    decode: dict[int, float] = field(default_factory=dict)  # batch -> aggregate tok/s
    prefill: float = 0.0  # tok/s
    ttft_ms: float = 0.0
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    note: str = ""


def _machine() -> str:
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = "+".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                              "avx512_bf16", "amx_tile") if f in have)
                break
    except OSError:
        pass
    return (f"{name} ({flags}), {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


# --- contenders ---------------------------------------------------------------------------
#
# Every contender is loaded first; then each round measures every contender once, one after
# the other, so a contender's numbers and its neighbours' are seconds apart, not minutes:
# on a shared machine the load drifts, and a ratio of numbers taken minutes apart measured
# the drift as much as the code. Each metric is the median over the rounds.


@dataclass
class Samples:
    prefill: list[float] = field(default_factory=list)  # tok/s
    ttft: list[float] = field(default_factory=list)  # seconds
    decode: dict[int, list[float]] = field(default_factory=dict)  # batch -> aggregate tok/s

    def to_row(self, row: Row) -> Row:
        row.prefill = statistics.median(self.prefill)
        row.ttft_ms = 1000 * statistics.median(self.ttft)
        row.decode = {b: statistics.median(v) for b, v in self.decode.items()}
        return row


class ParleyContender:
    """A Parley engine ("fp32" or the NF4 kernels) driven as the scheduler drives it."""

    def __init__(self, label: str, engine, threads: int, prompt: list[int], chat: list[int],
                 n_decode: int):
        self.engine, self.threads = engine, threads
        self.prompt, self.chat, self.n_decode = prompt, chat, n_decode
        self.cache = engine.model.new_cache(max(BATCHES), len(prompt) + len(chat) + n_decode + 8)
        self.row = Row(label, f"{engine.weights} × {engine.activations}",
                       weight_bytes=engine.weight_bytes(),
                       kv_bytes_per_token=engine.kv_bytes_per_token)
        self.samples = Samples()

    def round(self) -> None:
        from agent.decoder.generate import decode_one, prefill
        from agent.decoder.sampling import greedy_tokens

        # NF4: the kernels' own pool does the work, torch's ops run on one thread (see
        # _use_kernel_threads); fp32: torch's matmuls want every thread.
        torch.set_num_threads(self.threads)
        model, cache, chat = self.engine.model, self.cache, self.chat
        with torch.inference_mode():
            prefill(model, cache, 0, chat)  # warm-up
            cache.reset(0)
            began = time.perf_counter()
            prefill(model, cache, 0, self.prompt)
            self.samples.prefill.append(len(self.prompt) / (time.perf_counter() - began))
            cache.reset(0)
            began = time.perf_counter()
            int(prefill(model, cache, 0, chat).argmax())
            self.samples.ttft.append(time.perf_counter() - began)
            for batch in BATCHES:
                slots = list(range(batch))
                tokens = []
                for s in slots:
                    cache.reset(s)
                    tokens.append(int(prefill(model, cache, s, chat).argmax()))
                decode_one(model, cache, tokens, slots, [len(chat)] * batch)  # warm-up
                began = time.perf_counter()
                for i in range(self.n_decode):
                    logits = decode_one(model, cache, tokens, slots,
                                        [len(chat) + 1 + i] * batch)
                    tokens = greedy_tokens(logits)  # as the scheduler takes them
                rate = batch * self.n_decode / (time.perf_counter() - began)
                self.samples.decode.setdefault(batch, []).append(rate)


def _parley_contenders(settings: Settings, model_name: str, n_decode: int,
                       ) -> tuple[list[ParleyContender], list[int], list[int], Path]:
    from agent.decoder.engine import load_engine

    threads = torch.get_num_threads()
    engines = []
    seen: set[tuple[str, str]] = set()
    for label, backend, changes in (("PyTorch fp32 (dequantised GGUF)", "fp32", {}),
                                    ("Parley", "auto", {}),
                                    ("Parley", "auto", {"llm_activations": "int8"}),
                                    ("Parley", "auto", {"llm_weights": "nf4"})):
        if backend != "fp32":
            _use_kernel_threads(settings, threads)
        engine = load_engine(model_name, backend=backend, progress=False,
                             settings=replace(settings, **changes))  # type: ignore[arg-type]
        torch.set_num_threads(threads)
        if (engine.weights, engine.activations) in seen:
            continue  # the default already is this one (a 16-bit source runs NF4)
        seen.add((engine.weights, engine.activations))
        if backend != "fp32":
            label = f"Parley {engine.backend}" + ("" if changes else " (default)")
        print(f"  {label} / {engine.weights} / {engine.activations}: loaded in "
              f"{engine.load_seconds:.1f} s", flush=True)
        engines.append((label, engine, threads if backend == "fp32" else 1))
    first = engines[0][1]
    prompt = first.tokenizer.encode(FILLER * 40)[:PREFILL_TOKENS]
    chat = first.encode_prompt(CHAT_PROMPT)
    contenders = [ParleyContender(label, engine, n, prompt, chat, n_decode)
                  for label, engine, n in engines]
    return contenders, prompt, chat, first.path


def _use_kernel_threads(settings: Settings, threads: int) -> None:
    """The NF4 row: kernels on their own pool of `threads`, torch's own ops on one thread.

    torch's OpenMP team waits at every op for all its threads; on a loaded 2-core machine a
    descheduled one stalls each op for a time slice (decode fell to ~2 tok/s with 2 torch
    threads while other work ran here). The decode step's torch ops are tiny anyway.
    """
    from agent.decoder.kernels import get_backend

    backend = get_backend("cpu", settings.cache_dir)
    backend.set_threads(threads)  # type: ignore[attr-defined]
    torch.set_num_threads(1)


class LlamaContender:
    """llama.cpp (llama-cpp-python) on the same GGUF: one stream."""

    def __init__(self, llama_cpp, path: Path, prompt: Sequence[int], chat: Sequence[int],
                 n_decode: int, threads: int):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.prompt, self.chat, self.n_decode = list(prompt), list(chat), n_decode
        self.row = Row(f"llama.cpp {llama_cpp.__version__} ({threads} threads)",
                       "the file's × int8", weight_bytes=path.stat().st_size, note="single stream")
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        n_head = int(meta.get(f"{arch}.attention.head_count", 1))
        head_dim = int(meta.get(f"{arch}.embedding_length", 0)) // n_head
        self.row.kv_bytes_per_token = (2 * int(meta.get(f"{arch}.block_count", 0)) * head_dim
                                       * 2 * int(meta.get(f"{arch}.attention.head_count_kv",
                                                          n_head)))
        self.samples = Samples()

    def _evaluate(self, ids: Sequence[int]) -> int:
        self.llm.eval(list(ids))
        return llama_next_token(self.llm)

    def round(self) -> None:
        llm = self.llm
        llm.reset()
        self._evaluate(self.chat)  # warm-up
        llm.reset()
        began = time.perf_counter()
        llm.eval(self.prompt)
        self.samples.prefill.append(len(self.prompt) / (time.perf_counter() - began))
        llm.reset()
        began = time.perf_counter()
        token = self._evaluate(self.chat)
        self.samples.ttft.append(time.perf_counter() - began)
        began = time.perf_counter()
        for _ in range(self.n_decode):
            token = self._evaluate([token])
        self.samples.decode.setdefault(1, []).append(
            self.n_decode / (time.perf_counter() - began))

    def close(self) -> None:
        self.llm.close()


def llama_next_token(llm) -> int:
    """The greedy next token after `llm.eval`, read from llama.cpp's own last logits.

    Without `logits_all` (which would run the output head over every prompt token and slow
    its prefill), llama-cpp-python 0.3 no longer copies logits into `llm.scores`: those rows
    stay zero and their argmax is token 0.
    """
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                   shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def _llama_contender(path: Path, prompt: Sequence[int], chat: Sequence[int], n_decode: int,
                     ) -> LlamaContender | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return LlamaContender(llama_cpp, path, prompt, chat, n_decode, torch.get_num_threads())


# --- report -------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(rows: list[Row], header: str, context: int) -> str:
    base = next((r for r in rows if r.name.startswith("llama.cpp")), None)
    lines = [header, "",
             "| implementation | weights × activations | decode b=1 tok/s | decode b=4 tok/s | "
             f"decode b=8 tok/s | prefill {PREFILL_TOKENS} tok/s | TTFT ms | weights | "
             f"KV / stream @{context} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        decode = [f"{r.decode[b]:.1f}" if b in r.decode else "—" for b in BATCHES]
        lines.append(f"| {r.name} | {r.weights} | {' | '.join(decode)} | {r.prefill:.0f} | "
                     f"{r.ttft_ms:.0f} | {_mb(r.weight_bytes)} | "
                     f"{_mb(r.kv_bytes_per_token * context)} |")
    if base and base.decode.get(1):
        lines += ["", "Ratios against llama.cpp (decode at batch b is aggregate over b "
                  "streams, against llama.cpp's single stream):", "",
                  "| implementation | weights × activations | decode b=1 | b=4 | b=8 | prefill |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            if r is base:
                continue
            ratios = [f"{r.decode[b] / base.decode[1]:.2f}×" if b in r.decode else "—"
                      for b in BATCHES]
            lines.append(f"| {r.name} | {r.weights} | {' | '.join(ratios)} | "
                         f"{r.prefill / base.prefill:.2f}× |")
    return "\n".join(lines)


def bench_decoder(settings: Settings, args: argparse.Namespace) -> int:
    model_name = getattr(args, "model", None) or settings.llm_model
    quick = bool(getattr(args, "quick", False))
    n_decode, rounds = (16, 1) if quick else (64, 3)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"benchmarking {model_name} ({'quick' if quick else 'full'} run)...", flush=True)
    threads = torch.get_num_threads()
    contenders, prompt, chat, path = _parley_contenders(settings, model_name, n_decode)
    llama = _llama_contender(path, prompt, chat, n_decode)
    if llama is None:
        print("  llama.cpp: llama-cpp-python is not installed; no comparison row", flush=True)
    everyone: list[ParleyContender | LlamaContender] = [*contenders, *([llama] if llama else [])]
    for number in range(rounds):
        print(f"  round {number + 1} of {rounds}", flush=True)
        for contender in everyone:
            contender.round()
    torch.set_num_threads(threads)
    if llama is not None:
        llama.close()
    rows = [c.samples.to_row(c.row) for c in everyone]
    header = (f"### Decoder benchmark: {model_name} ({path.name})\n\n"
              f"{stamp}; {_machine()}. Greedy decoding of {n_decode} tokens after a "
              f"{len(chat)}-token chat prompt; prefill of {len(prompt)} tokens; "
              f"median of {rounds} rounds, each measuring every implementation in turn. "
              f"Parley on the CPU: kernels on their own {threads} threads, torch's "
              f"other ops on one. Parley's weights include the embedding table, kept in "
              f"float32.")
    print()
    print(render(rows, header, context=2048))
    return 0
