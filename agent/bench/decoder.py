"""`parley bench decoder`: Parley's decoder side by side with llama.cpp, in one run.

For each implementation, one after the other in this process (never concurrently):
    PyTorch fp32   the dequantised GGUF weights in plain nn.Linear (the ground truth)
    Parley NF4     the NF4 model on the default kernel backend ("auto": cpu here)
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
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    decode: dict[int, float] = field(default_factory=dict)  # batch -> aggregate tok/s
    prefill: float = 0.0  # tok/s
    ttft_ms: float = 0.0
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    note: str = ""


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


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


# --- Parley engines ------------------------------------------------------------------------


def _bench_engine(label: str, engine, prompt: list[int], chat: list[int], n_decode: int,
                  repeats: int) -> Row:
    from agent.decoder.generate import decode_one, prefill

    model = engine.model
    context = max(len(prompt), len(chat)) + n_decode + 8
    cache = model.new_cache(max(BATCHES), context)
    row = Row(label, weight_bytes=engine.weight_bytes(),
              kv_bytes_per_token=engine.kv_bytes_per_token)
    with torch.inference_mode():
        prefill(model, cache, 0, chat)  # warm-up

        def run_prefill() -> None:
            cache.reset(0)
            prefill(model, cache, 0, prompt)

        row.prefill = len(prompt) / _timed(run_prefill, repeats)

        def first_token() -> None:
            cache.reset(0)
            int(prefill(model, cache, 0, chat).argmax())

        row.ttft_ms = 1000 * _timed(first_token, repeats)
        for batch in BATCHES:
            slots = list(range(batch))
            tokens = []
            for s in slots:
                cache.reset(s)
                tokens.append(int(prefill(model, cache, s, chat).argmax()))
            decode_one(model, cache, tokens, slots, [len(chat)] * batch)  # warm-up
            began = time.perf_counter()
            for i in range(n_decode):
                logits = decode_one(model, cache, tokens, slots, [len(chat) + 1 + i] * batch)
                tokens = logits.argmax(dim=-1).tolist()
            row.decode[batch] = batch * n_decode / (time.perf_counter() - began)
    return row


def _parley_rows(settings: Settings, model_name: str, n_decode: int, repeats: int,
                 ) -> tuple[list[Row], list[int], list[int], Path]:
    from agent.decoder.engine import load_engine

    rows = []
    prompt: list[int] = []
    chat: list[int] = []
    path = Path()
    threads = torch.get_num_threads()
    for label, backend in (("PyTorch fp32 (dequantised GGUF)", "fp32"),
                           ("Parley NF4 (auto backend)", "auto")):
        if backend != "fp32":
            _use_kernel_threads(settings, threads)
        engine = load_engine(model_name, settings=settings, backend=backend)
        if not prompt:
            ids = engine.tokenizer.encode(FILLER * 40)
            prompt = ids[:PREFILL_TOKENS]
            chat = engine.encode_prompt(CHAT_PROMPT)
            path = engine.path
        if backend != "fp32":
            label = f"Parley NF4 ({engine.backend})"
        print(f"  {label}: loaded in {engine.load_seconds:.1f} s", flush=True)
        rows.append(_bench_engine(label, engine, prompt, chat, n_decode, repeats))
        del engine
        gc.collect()
        torch.set_num_threads(threads)
    return rows, prompt, chat, path


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


# --- llama.cpp ----------------------------------------------------------------------------


def _llama_row(path: Path, prompt: Sequence[int], chat: Sequence[int], n_decode: int,
               repeats: int) -> Row | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    row = Row(f"llama.cpp {llama_cpp.__version__} ({threads} threads)",
              weight_bytes=path.stat().st_size, note="single stream")
    meta = llm.metadata
    arch = meta.get("general.architecture", "llama")
    n_head = int(meta.get(f"{arch}.attention.head_count", 1))
    head_dim = int(meta.get(f"{arch}.embedding_length", 0)) // n_head
    row.kv_bytes_per_token = (2 * int(meta.get(f"{arch}.block_count", 0)) * head_dim * 2
                              * int(meta.get(f"{arch}.attention.head_count_kv", n_head)))

    def evaluate(ids: Sequence[int]) -> int:
        llm.eval(list(ids))
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def run_prefill() -> None:
        llm.reset()
        llm.eval(list(prompt))

    evaluate(chat)  # warm-up
    row.prefill = len(prompt) / _timed(run_prefill, repeats)

    def first_token() -> None:
        llm.reset()
        evaluate(chat)

    row.ttft_ms = 1000 * _timed(first_token, repeats)
    llm.reset()
    token = evaluate(chat)
    began = time.perf_counter()
    for _ in range(n_decode):
        token = evaluate([token])
    rate = n_decode / (time.perf_counter() - began)
    row.decode = {1: rate}
    llm.close()
    return row


# --- report -------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(rows: list[Row], header: str, context: int) -> str:
    base = next((r for r in rows if r.name.startswith("llama.cpp")), None)
    lines = [header, "",
             "| implementation | decode b=1 tok/s | decode b=4 tok/s | decode b=8 tok/s | "
             f"prefill {PREFILL_TOKENS} tok/s | TTFT ms | weights | KV / stream @{context} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        decode = [f"{r.decode[b]:.1f}" if b in r.decode else "—" for b in BATCHES]
        lines.append(f"| {r.name} | {' | '.join(decode)} | {r.prefill:.0f} | {r.ttft_ms:.0f} | "
                     f"{_mb(r.weight_bytes)} | {_mb(r.kv_bytes_per_token * context)} |")
    if base and base.decode.get(1):
        lines += ["", "Ratios against llama.cpp (decode at batch b is aggregate over b "
                  "streams, against llama.cpp's single stream):", "",
                  "| implementation | decode b=1 | b=4 | b=8 | prefill |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r is base:
                continue
            ratios = [f"{r.decode[b] / base.decode[1]:.2f}×" if b in r.decode else "—"
                      for b in BATCHES]
            lines.append(f"| {r.name} | {' | '.join(ratios)} | "
                         f"{r.prefill / base.prefill:.2f}× |")
    return "\n".join(lines)


def bench_decoder(settings: Settings, args: argparse.Namespace) -> int:
    model_name = getattr(args, "model", None) or settings.llm_model
    quick = bool(getattr(args, "quick", False))
    n_decode, repeats = (16, 1) if quick else (64, 3)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"benchmarking {model_name} ({'quick' if quick else 'full'} run)...", flush=True)
    rows, prompt, chat, path = _parley_rows(settings, model_name, n_decode, repeats)
    llama = _llama_row(path, prompt, chat, n_decode, repeats)
    if llama is None:
        print("  llama.cpp: llama-cpp-python is not installed; no comparison row", flush=True)
    else:
        rows.append(llama)
    header = (f"### Decoder benchmark: {model_name} ({path.name})\n\n"
              f"{stamp}; {_machine()}. Greedy decoding of {n_decode} tokens after a "
              f"{len(chat)}-token chat prompt; prefill of {len(prompt)} tokens; "
              f"median of {repeats}. Parley NF4 on the CPU: kernels on their own "
              f"{torch.get_num_threads()} threads, torch's other ops on one. Parley's weights "
              f"include the embedding table, kept in float32.")
    print()
    print(render(rows, header, context=2048))
    return 0
