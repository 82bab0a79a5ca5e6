"""`parley bench gpu`: the decoder on CUDA, checked and then timed, in one run that ends
well inside 8 minutes on one H100/H200.

1. The device: its name, and the bandwidth of a device-to-device copy (bytes read and
   written), against which the decode bound is reckoned.
2. Correctness on CUDA: a tiny random model of ragged sizes (random_model.tiny_args) in
   NF4 and in a GGUF's own Q4_1 blocks through the triton backend (the engine's path:
   CUDA graphs, the float16 cache, sampling on the device) against the PyTorch reference
   on the CPU (float32, the same cache precision): logits and greedy tokens.
3. Per linear, Llama-3-8B shapes: Parley's NF4 and native 4-bit kernels against cuBLAS on
   the same weights in float16, at 1, 4 and 16 rows and a 2048-row prefill
   (`agent.bench.kernels`, each result checked against the dequantised matmul).
4. The whole 8B-shaped model, random weights generated on the device (no model file can
   travel there): decode tokens/s at batch 1, 8 and 32, and a 2048-token prefill, Parley's
   NF4 model (its default: float32 activations, an 8-bit head, float16 KV cache, CUDA
   graphs) against the same weights in bfloat16 in plain PyTorch (nn.Linear, cuBLAS) with
   the same attention kernel and CUDA graphs, the baseline a user would reach for; and the
   bandwidth bound (bytes a decode step reads / the measured copy bandwidth). Before the
   timing, the two models' logits are compared (their weights are the same values).

    python -m agent.bench.gpu [--json FILE] [--quick]   (what `parley bench gpu` runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from agent.decoder.cuda_graphs import DecodeRunner
from agent.decoder.model import ModelArgs, Transformer, build_model
from agent.decoder.random_model import LLAMA3_8B, random_tensors, tiny_args

DECODE_BATCHES = (1, 8, 32)
CONTEXT = 256  # tokens each stream holds before the timed decode steps
PREFILL = 2048


def _events_ms(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call of fn, by CUDA events around `repeats` calls after one."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting reads and writes."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _events_ms(partial(dst.copy_, src), 10)
    return 2 * (1 << 31) / (ms / 1e3)


# --- 2. correctness on a tiny model ---------------------------------------------------------


def tiny_pair(weights: str, device: str) -> tuple[Transformer, Transformer]:
    """(the triton model on CUDA, the reference on the CPU) with the same quantised
    weights: "nf4" (NF4 linears, the 8-bit head) or "q4_1" (the GGUF's own blocks)."""
    from agent.decoder.kernels import get_backend
    from agent.decoder.kernels.triton_backend import TritonBackend
    from agent.decoder.quantize import install_weights, linear_names, quantise_linears

    args = tiny_args("qwen2")  # with q/k/v biases
    tensors = random_tensors(args, seed=7)
    ref = build_model(args, dict(tensors))
    names = linear_names(ref)
    if weights == "nf4":
        chosen: dict[str, Any] = dict(quantise_linears(ref, names, progress=False))
    else:
        chosen = {name: _as_q4_1(ref.get_submodule(name)) for name in names}
    tri = build_model(args, dict(tensors))
    install_weights(ref, dict(chosen), get_backend("reference"))
    install_weights(tri, dict(chosen), TritonBackend(device))
    tri.to(device)
    ref.cache_dtype = torch.float16  # the kernel's cache precision: only sums' order differs
    return tri, ref


def _as_q4_1(linear: nn.Module) -> Any:
    assert isinstance(linear, nn.Linear)
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from agent.decoder import native

    w = linear.weight.detach().float()
    n, k = w.shape
    blocks = quantize(w.numpy(), Q.Q4_1)
    out = native.from_blocks(blocks, Q.Q4_1, (n, k))
    if linear.bias is not None:
        out.bias = linear.bias.detach().float().contiguous()
    return out


def greedy_logits(model: Transformer, ids: list[int], steps: int, *,
                  static: bool = False) -> tuple[Tensor, list[int]]:
    """The logits of prompt `ids` [T, vocab] and of `steps` greedy decode steps after it
    [T + steps, vocab] (float32, CPU), and the greedy tokens; decode steps through a
    DecodeRunner (CUDA graphs on CUDA, the static path eagerly elsewhere with `static`)."""
    cache = model.new_cache(2, 512)
    decode = DecodeRunner(model, cache, static=static)
    with torch.inference_mode():
        rows = [model(torch.tensor([ids]), cache, [1], [0], all_logits=True)[0]]
        token, pos, out = int(rows[0][-1].argmax()), len(ids), []
        for _ in range(steps):
            out.append(token)
            logits = decode([token], [1], [pos])
            rows.append(logits)
            token, pos = int(logits[0].argmax()), pos + 1
    return torch.cat(rows).float().cpu(), out


def check_tiny(device: str = "cuda") -> list[dict[str, Any]]:
    results = []
    ids = list(range(3, 3 + 40))
    for weights in ("nf4", "q4_1"):
        tri, ref = tiny_pair(weights, device)
        got_logits, got = greedy_logits(tri, ids, 24, static=True)
        want_logits, want = greedy_logits(ref, ids, 24)
        err = float((got_logits - want_logits).abs().max() / want_logits.abs().max())
        results.append({"weights": weights, "max_rel_err": err, "tokens_equal": got == want,
                        "tokens": len(got)})
    return results


# --- 4. the whole 8B-shaped model -------------------------------------------------------


def _random_weights(model: Transformer, device: str) -> dict[str, Any]:
    """Random NF4 weights (the 8-bit head, as Parley's default) for every linear of
    `model`, made where they will run."""
    from agent.decoder import nf4, q8
    from agent.decoder.quantize import HEAD, linear_names

    gen = torch.Generator(device=device).manual_seed(0)
    out: dict[str, Any] = {}
    for name in linear_names(model):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        n, k = lin.out_features, lin.in_features
        kp = -(-k // 64) * 64
        scale = 1.6 / k ** 0.5  # codebook values have RMS ~0.6: weights ~N(0, 1/K)
        if name == HEAD:
            out[name] = q8.Q8Weight(
                qweight=torch.randint(-127, 128, (n, kp), dtype=torch.int8, device=device,
                                      generator=gen),
                scales=torch.full((n, kp // 64), scale / 127 * 1.7, dtype=torch.float16,
                                  device=device), shape=(n, k))
        else:
            jitter = 0.75 + 0.5 * torch.rand(n, kp // 64, device=device, generator=gen)
            out[name] = nf4.NF4Weight(
                qweight=torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, device=device,
                                      generator=gen),
                scales=(scale * jitter).half(), shape=(n, k))
    return out


def _skeleton(args: ModelArgs, dtype: torch.dtype, device: str) -> Transformer:
    """A Transformer of `args` on `device` with random embeddings and unit norms; its
    linears stay on the meta device (the caller fills them: no float copy of a 8B model
    is ever made)."""
    with torch.device("meta"):
        model = Transformer(args)
    gen = torch.Generator(device=device).manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.Linear) or mod is model:
            continue
        for pname, param in list(mod.named_parameters(recurse=False)):
            value = torch.ones(param.shape, dtype=dtype, device=device)
            if isinstance(mod, nn.Embedding):
                value.normal_(generator=gen)
            setattr(mod, pname, nn.Parameter(value, requires_grad=False))
    model.setup_rope()
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    return model.eval()


def build_8b_pair(args: ModelArgs = LLAMA3_8B, device: str = "cuda",
                  baseline_dtype: torch.dtype = torch.bfloat16,
                  ) -> tuple[Transformer, Transformer]:
    """(Parley's NF4 model on the triton backend, the `baseline_dtype` nn.Linear baseline
    holding the same weights' values), both with the token attention kernel and a
    float16 cache."""
    from agent.decoder import nf4, q8
    from agent.decoder.kernels.triton_attention import token_attention
    from agent.decoder.kernels.triton_backend import TritonBackend
    from agent.decoder.quantize import install_weights

    parley = _skeleton(args, torch.float32, device)
    weights = _random_weights(parley, device)
    base = _skeleton(args, baseline_dtype, device)
    with torch.no_grad():
        base.tok_embeddings.weight.copy_(parley.tok_embeddings.weight)
        for name, w in weights.items():
            dense = (q8.dequantise(w) if isinstance(w, q8.Q8Weight)
                     else nf4.dequantise(w)).to(baseline_dtype)
            base.get_submodule(name).weight = nn.Parameter(dense, requires_grad=False)
    install_weights(parley, weights, TritonBackend(device))
    base.token_attention, base.token_attention_prefill = token_attention, False
    base.cache_dtype = torch.float16
    if device == "cuda":
        torch.cuda.empty_cache()
    return parley, base


def step_bytes(model: Transformer, args: ModelArgs, context: int) -> float:
    """Bytes one batch-1 decode step reads: every weight matrix once, one embedding row,
    the norms, and the stream's keys and values."""
    from agent.decoder.quantize import QuantLinear

    total = 0.0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in mod.buffers(recurse=False))
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    total += args.dim * model.tok_embeddings.weight.element_size() * (2 * args.n_layer + 2)
    total += context * 2 * args.n_layer * args.n_kv_head * args.head_dim * 2
    return total


def _sync(model: Transformer) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def decode_tokens_per_s(model: Transformer, batch: int, steps: int,
                        context: int = CONTEXT) -> float:
    cache = model.new_cache(batch, context + steps + 8)
    gen = torch.Generator().manual_seed(batch)
    with torch.inference_mode():
        for slot in range(batch):  # each stream holds `context` tokens
            model(torch.randint(0, model.args.vocab_size, (1, context), generator=gen),
                  cache, [slot], [0])
        decode = DecodeRunner(model, cache)
        slots = list(range(batch))
        tokens = [1] * batch
        decode(tokens, slots, [context] * batch)  # captures the graph for this batch
        for s in slots:
            cache.truncate(s, context)
        _sync(model)
        began = time.perf_counter()
        for i in range(steps):
            logits = decode(tokens, slots, [context + i] * batch)
            tokens = logits.argmax(dim=-1).tolist()  # the host reads each step's tokens
        elapsed = time.perf_counter() - began
    return batch * steps / elapsed


def prefill_ms(model: Transformer, tokens: int) -> float:
    cache = model.new_cache(1, tokens)
    ids = torch.randint(0, model.args.vocab_size, (1, tokens))
    with torch.inference_mode():
        ms = _events_ms(partial(model, ids, cache, [0], [0]), 2)
    return ms


def compare_models(parley: Transformer, base: Transformer) -> dict[str, float]:
    """The two models' logits on one prompt: the same weight values, so what differs is
    bfloat16 activations in the baseline."""
    ids = torch.randint(0, parley.args.vocab_size, (1, 64),
                        generator=torch.Generator().manual_seed(3))
    out = []
    with torch.inference_mode():
        for model in (parley, base):
            cache = model.new_cache(1, 128)
            out.append(model(ids, cache, [0], [0]).float()[0])
            del cache
    a, b = out
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"cosine": cos, "top1_equal": float(int(a.argmax()) == int(b.argmax()))}


# --- the run ------------------------------------------------------------------------------


def run(json_path: str | None = None, quick: bool = False) -> int:
    if not torch.cuda.is_available():
        print("parley bench gpu needs a CUDA device", file=sys.stderr)
        return 2
    began = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        print("parley bench gpu needs Triton", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth()
    report["copy_GBps"] = bandwidth / 1e9
    print(f"{report['device']}: device copy {bandwidth / 1e9:.0f} GB/s", flush=True)

    report["tiny"] = check_tiny()
    for r in report["tiny"]:
        print(f"tiny model, {r['weights']}: max rel. logit error {r['max_rel_err']:.1e}, "
              f"greedy tokens equal: {r['tokens_equal']}", flush=True)

    from agent.bench.kernels import bench_model, render

    rows = bench_model("Llama-3-8B", decode_rows=(1, 4, 16), prefill_rows=(PREFILL,),
                       native=True)
    report["kernels"] = [r.__dict__ for r in rows]
    print(render(rows, report["device"]), flush=True)

    args = replace(LLAMA3_8B, n_layer=8) if quick else LLAMA3_8B
    parley, base = build_8b_pair(args)
    report["agreement"] = compare_models(parley, base)
    print(f"8B-shaped NF4 vs bf16 logits: {report['agreement']}", flush=True)
    bound = bandwidth / step_bytes(parley, args, CONTEXT)
    whole: list[dict[str, Any]] = []
    for batch in DECODE_BATCHES:
        steps = 16 if quick else 32
        p, b = decode_tokens_per_s(parley, batch, steps), decode_tokens_per_s(base, batch, steps)
        whole.append({"batch": batch, "parley_tok_s": p, "bf16_tok_s": b})
        print(f"decode batch {batch}: Parley NF4 {p:.1f} tok/s, bf16 {b:.1f} tok/s, "
              f"{p / b:.2f}x" + (f"; bound {bound:.0f} tok/s ({p / bound:.0%})"
                                 if batch == 1 else ""), flush=True)
    report["decode"] = whole
    report["bound_tok_s_batch1"] = bound
    pf_p, pf_b = prefill_ms(parley, PREFILL), prefill_ms(base, PREFILL)
    report["prefill"] = {"tokens": PREFILL, "parley_ms": pf_p, "bf16_ms": pf_b}
    print(f"prefill {PREFILL}: Parley {pf_p:.1f} ms, bf16 {pf_b:.1f} ms, "
          f"{pf_b / pf_p:.2f}x", flush=True)
    report["seconds"] = time.perf_counter() - began
    print(render_report(report))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
    ok = all(r["tokens_equal"] and r["max_rel_err"] < 1e-2 for r in report["tiny"])
    return 0 if ok else 1


def render_report(report: dict[str, Any]) -> str:
    lines = [f"{report['device']} ({report['date']}, torch {report['torch']}, Triton "
             f"{report['triton']}); 8B-shaped model, random weights, {CONTEXT} tokens of "
             "context per stream", "",
             "| batch | Parley NF4 tok/s | bf16 + CUDA graphs tok/s | Parley ÷ bf16 |",
             "|---:|---:|---:|---:|"]
    for d in report["decode"]:
        lines.append(f"| {d['batch']} | {d['parley_tok_s']:.1f} | {d['bf16_tok_s']:.1f} "
                     f"| {d['parley_tok_s'] / d['bf16_tok_s']:.2f}x |")
    pf = report["prefill"]
    lines += ["", f"Bandwidth bound at batch 1: {report['bound_tok_s_batch1']:.0f} tok/s "
              f"(copy {report['copy_GBps']:.0f} GB/s); prefill {pf['tokens']} tokens: "
              f"Parley {pf['parley_ms']:.1f} ms, bf16 {pf['bf16_ms']:.1f} ms "
              f"({pf['bf16_ms'] / pf['parley_ms']:.2f}x); whole run "
              f"{report['seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="an 8-layer model, fewer steps")
    args = parser.parse_args(argv)
    return run(args.json, args.quick)


if __name__ == "__main__":
    sys.exit(main())
