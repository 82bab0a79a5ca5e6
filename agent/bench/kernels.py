"""`parley bench kernels`: the Triton NF4 kernels against cuBLAS on a CUDA device.

For the linear layers of three model shapes (the two bundled models and an 8B Llama),
times one decode step's matrix work (1 and 16 rows) and a prefill's (512 and 2048 rows)
with each NF4 strategy of agent/decoder/kernels/triton_nf4.py and with cuBLAS on the
same weights in float16, side by side in one run, and checks every NF4 result against the
dequantise-then-matmul reference. Weights are random (speed does not depend on their
values). Times are the kernels' own (replayed from a CUDA graph, as a server that
captures its decode step sees them); "eager" adds Python's launch cost per call.

    python -m agent.bench.kernels [--json FILE]   (what `parley bench kernels` runs)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from agent.decoder import nf4
from agent.decoder.kernels.reference import reference_linear
from agent.decoder.kernels.triton_backend import TritonBackend
from agent.decoder.kernels.triton_nf4 import Strategy
from agent.decoder.native import NativeWeight
from agent.decoder.native import dequantise as native_dequantise

DECODE_ROWS = (1, 16)  # `parley bench gpu` adds 4
PREFILL_ROWS = (512, 2048)

# name: (dim, n_head, n_kv_head, head_dim, ffn, vocab, n_layer, qkv_bias)
SHAPES = {
    "Llama-3-8B": (4096, 32, 8, 128, 14336, 128256, 32, False),
    "Qwen2.5-0.5B": (896, 14, 2, 64, 4864, 151936, 24, True),
    "SmolLM2-135M": (576, 9, 3, 64, 1536, 49152, 30, False),
}

# One row always takes the GEMV; the default Strategy() is marked.
DECODE_STRATEGIES = {
    "gemv, select (default for 1 row)": Strategy(decode="gemv", codebook="select"),
    "gemv, pairs": Strategy(decode="gemv", codebook="pairs"),
    "gemv, table": Strategy(decode="gemv", codebook="table"),
    "dot, select": Strategy(decode="dot", codebook="select"),
    "dequantise + cuBLAS, select (default)": Strategy(decode="dequant", codebook="select"),
}
PREFILL_STRATEGIES = {
    "fused GEMM, select": Strategy(prefill="fused", codebook="select"),
    "dequantise + cuBLAS, select (default)": Strategy(prefill="dequant", codebook="select"),
}


@dataclass
class Row:
    model: str
    rows: int
    strategy: str
    nf4_ms: float  # one step's linears (every layer and the output head), kernel time
    nf4_eager_ms: float  # the same launched from Python one call at a time
    fp16_ms: float  # cuBLAS on float16 weights, kernel time
    weight_bytes: float  # NF4 bytes the step reads
    flops: float
    max_rel_err: float  # NF4 vs dequantised reference, worst matrix of the step


def linears(dim: int, n_head: int, n_kv: int, head_dim: int, ffn: int, vocab: int,
            n_layer: int, qkv_bias: bool) -> list[tuple[int, int, int, bool]]:
    """(out_features, in_features, count per step, bias) of the fused linears Parley runs."""
    return [((n_head + 2 * n_kv) * head_dim, dim, n_layer, qkv_bias),
            (dim, n_head * head_dim, n_layer, False), (2 * ffn, dim, n_layer, False),
            (dim, ffn, n_layer, False), (vocab, dim, 1, False)]


def _kernel_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=20))


def _eager_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


def random_native_u4(n: int, k: int, gen: torch.Generator) -> NativeWeight:
    """A random weight in the layout Q4_0/Q4_1/Q4_K land in (native.py): 4-bit values,
    a float16 scale and offset per 32 weights, made on the GPU."""
    kp = -(-k // 64) * 64
    groups = -(-(kp // 32) // 8) * 8
    scales = (torch.rand(n, groups, device="cuda", generator=gen) * 0.004).half()
    offsets = (-8 * scales.float()).half()
    return NativeWeight("u4", torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8,
                                            device="cuda", generator=gen),
                        scales, (n, k), offsets, None, "Q4_1")


def bench_model(name: str, decode_rows: tuple[int, ...] = DECODE_ROWS,
                prefill_rows: tuple[int, ...] = PREFILL_ROWS,
                native: bool = False) -> list[Row]:
    """Every strategy's time for one step's linears of model `name`; with `native`, also
    the GGUF-block kernels on a 4-bit layout (the GEMV, and the backend's default)."""
    acc: dict[tuple[int, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for n, k, count, has_bias in linears(*SHAPES[name]):
        gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        dense = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        bias = torch.randn(n, device="cuda", generator=gen) if has_bias else None
        w = TritonBackend("cuda").prepare(nf4.quantise(dense, bias))
        assert isinstance(w, nf4.NF4Weight)
        w16 = nf4.dequantise(w, torch.float32).to(torch.float16)  # same values as NF4
        b16 = None if bias is None else bias.half()
        del dense
        candidates: list[tuple[str, TritonBackend, Any, Any]] = []
        for label, strategy in {**DECODE_STRATEGIES, **PREFILL_STRATEGIES}.items():
            candidates.append((label, TritonBackend("cuda", strategy), w,
                               partial(reference_linear, w=w)))
        if native:
            u4 = random_native_u4(n, k, gen)
            u4.bias = None if bias is None else bias.float()
            dense_u4 = native_dequantise(u4)
            want_u4 = partial(_dense_linear, dense_u4, u4.bias)
            candidates += [
                ("native 4-bit, GEMV", TritonBackend("cuda", affine_gemv_rows=16), u4, want_u4),
                ("native 4-bit, default", TritonBackend("cuda"), u4, want_u4)]
        for rows in decode_rows + prefill_rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16, generator=gen)
            fp16 = _kernel_ms(partial(F.linear, x, w16, b16))
            decode = rows in decode_rows
            for label, backend, weight, reference in candidates:
                if not _applies(label, rows, decode):
                    continue
                want = reference(x.float())
                got = backend.linear(x, weight).float()  # also tunes the tiles for this shape
                cell = acc[(rows, label)]
                cell["err"] = max(cell["err"],
                                  float((got - want).abs().max() / want.abs().max()))
                cell["nf4"] += count * _kernel_ms(partial(backend.linear, x, weight))
                cell["eager"] += count * _eager_ms(partial(backend.linear, x, weight))
                cell["fp16"] += count * fp16
                cell["bytes"] += count * sum(t.numel() * t.element_size()
                                             for t in (weight.qweight, weight.scales,
                                                       getattr(weight, "offsets", None))
                                             if t is not None)
                cell["flops"] += count * 2.0 * rows * n * k
    return [Row(name, rows, label, c["nf4"], c["eager"], c["fp16"], c["bytes"], c["flops"],
                c["err"]) for (rows, label), c in acc.items()]


def _applies(label: str, rows: int, decode: bool) -> bool:
    if label.startswith("native"):
        return not (label.endswith("GEMV") and rows > 16) and not (
            rows == 1 and label.endswith("default"))  # one row: the default is the GEMV
    if decode:
        strategy = DECODE_STRATEGIES.get(label)
        return strategy is not None and (rows > 1 or strategy.decode == "gemv")
    return label in PREFILL_STRATEGIES


def _dense_linear(dense: torch.Tensor, bias: torch.Tensor | None,
                  x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dense, bias)


def render(rows: list[Row], device: str) -> str:
    lines = [f"{device}; float16 activations; one step's linears (every layer and the head)",
             "", "| model | rows | kernel (strategy) | Parley | cuBLAS fp16 "
             "| Parley / cuBLAS speed | weight GB/s | TFLOP/s | eager | max rel. error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.rows} | {r.strategy} | {r.nf4_ms:.3f} ms | {r.fp16_ms:.3f} ms "
            f"| {r.fp16_ms / r.nf4_ms:.2f}x | {r.weight_bytes / r.nf4_ms / 1e6:.0f} "
            f"| {r.flops / r.nf4_ms / 1e9:.1f} | {r.nf4_eager_ms:.3f} ms "
            f"| {r.max_rel_err:.1e} |")
    return "\n".join(lines)


def run(json_path: str | None = None, models: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("parley bench kernels needs a CUDA device (the Triton kernels' CPU runs are "
              "the interpreter's, for tests only)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    rows: list[Row] = []
    for name in models or list(SHAPES):
        rows += bench_model(name)
        print(render(rows, device), flush=True)
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"device": device, "torch": torch.__version__,
                           "rows": [asdict(r) for r in rows]}, fh, indent=1)
    bad = [(r.model, r.rows, r.strategy) for r in rows if r.max_rel_err > 2e-2]
    if bad:
        print(f"NF4 results off the reference: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--model", action="append", choices=list(SHAPES))
    args = parser.parse_args(argv)
    return run(args.json, args.model)


if __name__ == "__main__":
    sys.exit(main())
