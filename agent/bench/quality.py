"""`parley bench quality`: how often each decoder configuration answers right.

Every question of `agent.bench.quality_cases` (general knowledge, arithmetic, and
customer-support questions answered from the shop's system prompt) is rendered as the chat
endpoint renders a text request — the system message and the user message through the
model's chat template — and answered greedily (temperature 0) by:

    PyTorch fp32         the dequantised GGUF weights in nn.Linear: the ground truth
    <backend> / <format> × <activations>
                         Parley's kernels: the default first (native weights for a
                         quantised GGUF, int8x2 activations), the native weights with the
                         other activations, then nf4 and q8
    llama.cpp            llama-cpp-python on the same GGUF and the same prompt ids, when
                         installed (a bench-only extra)

Reported per row: accuracy overall and per group, and greedy agreement with fp32 — how
many tokens of the fp32 continuation of each fixed prompt a row reproduces before its
first different token, with fp32's own top-2 logit margin at that position (a margin of a
few hundredths is a near-tie that any rounding can flip; a large one is a real error).
Configurations are loaded and measured one at a time, so each has the whole machine.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from agent.bench.decoder import _machine, llama_next_token
from agent.bench.quality_cases import QUESTIONS, Question, correct
from agent.config import Settings

ANSWER_TOKENS = 48
AGREEMENT_TOKENS = 40
GROUPS = ("general", "arithmetic", "support")
AGREEMENT_PROMPTS = (
    "Explain in three sentences how a bicycle's gears work.",
    "Write a short, friendly reply to a customer whose parcel arrived late.",
    "List five fruits that are yellow when ripe.",
    "What should I pack for a weekend hiking trip in the mountains?",
)

# A decoder step: the prompt ids in, greedy ids out (stopping at end of generation).
Greedy = Callable[[Sequence[int], int], list[int]]


@dataclass
class Result:
    name: str
    answers: dict[str, list[bool]] = field(default_factory=dict)  # group -> right or not
    agreement: list[int] = field(default_factory=list)  # matched tokens per fixed prompt
    reference_lengths: list[int] = field(default_factory=list)  # fp32's, up to its EOG
    margins: list[float | None] = field(default_factory=list)  # fp32 margin at divergence
    seconds: float = 0.0
    replies: list[str] = field(default_factory=list)
    continuations: list[list[int]] = field(default_factory=list)  # greedy ids per fixed prompt

    @property
    def right(self) -> int:
        return sum(sum(v) for v in self.answers.values())

    @property
    def asked(self) -> int:
        return sum(len(v) for v in self.answers.values())


def _chat_ids(tokenizer, question: Question) -> list[int]:
    return tokenizer.encode_chat([{"role": "system", "content": question.system},
                                  {"role": "user", "content": question.text}])


def _parley_greedy(engine) -> Greedy:
    from agent.decoder.generate import generate
    from agent.decoder.sampling import SamplingParams

    cache = engine.model.new_cache(1, 1024)

    def run(prompt: Sequence[int], n: int) -> list[int]:
        ids: list[int] = []
        for delta in generate(engine.model, engine.tokenizer, prompt,
                              SamplingParams(temperature=0.0, max_tokens=n), cache=cache):
            ids.extend(t for t in delta.token_ids if t not in engine.tokenizer.eog_ids)
        return ids

    return run


def _llama_greedy(llm, eog: frozenset[int]) -> Greedy:
    def run(prompt: Sequence[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(list(prompt))
        ids: list[int] = []
        while len(ids) < n:
            token = llama_next_token(llm)
            if token in eog:
                break
            ids.append(token)
            llm.eval([token])
        return ids

    return run


def _fp32_margins(engine, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
    """fp32's top-1 minus top-2 logit at each position of its own continuation."""
    from agent.decoder.generate import decode_one, prefill

    cache = engine.model.new_cache(1, len(prompt) + len(continuation) + 1)
    margins = []
    with torch.inference_mode():
        logits = prefill(engine.model, cache, 0, prompt)
        for n, token in enumerate(continuation):
            top = logits.float().topk(2).values
            margins.append(float(top[0] - top[1]))
            logits = decode_one(engine.model, cache, [token], [0], [len(prompt) + n])[0]
    return margins


def _measure(name: str, greedy: Greedy, tokenizer, reference: list[list[int]] | None,
             margins: list[list[float]] | None, prompts: list[list[int]]) -> Result:
    result = Result(name)
    began = time.perf_counter()
    for question in QUESTIONS:
        reply = tokenizer.decode(greedy(_chat_ids(tokenizer, question), ANSWER_TOKENS))
        result.replies.append(reply)
        result.answers.setdefault(question.group, []).append(correct(question, reply))
    result.continuations = continuations = [greedy(p, AGREEMENT_TOKENS) for p in prompts]
    result.seconds = time.perf_counter() - began
    for n, ids in enumerate(continuations):
        want = reference[n] if reference is not None else ids
        same = next((i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b),
                    min(len(ids), len(want)))
        result.agreement.append(same)
        result.reference_lengths.append(len(want))
        diverged = same < max(len(ids), len(want))
        result.margins.append(margins[n][same] if diverged and margins is not None
                              and same < len(margins[n]) else None)
    return result


def _row(result: Result, base: Result | None) -> str:
    groups = [f"{sum(result.answers.get(g, []))}/{len(result.answers.get(g, []))}"
              for g in GROUPS]
    ratio = (f"{result.right / base.right:.2f}×" if base is not None and base.right else "—")
    agree = ", ".join(f"{a}/{n}" for a, n in zip(result.agreement, result.reference_lengths,
                                                  strict=True))
    margins = ", ".join(f"{m:.2f}" for m in result.margins if m is not None) or "—"
    return (f"| {result.name} | **{result.right}/{result.asked}** | {' | '.join(groups)} | "
            f"{ratio} | {agree} | {margins} | {result.seconds:.0f} s |")


def render(results: list[Result], header: str) -> str:
    base = next((r for r in results if r.name.startswith("llama.cpp")), None)
    lines = [header, "",
             "| configuration | right | general | arithmetic | support | vs llama.cpp | "
             "greedy tokens equal to fp32's, per prompt | "
             "fp32 margin where they part | time |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    lines += [_row(r, base) for r in results]
    return "\n".join(lines)


def _configurations(settings: Settings, path: Path) -> list[Settings]:
    """What to measure after fp32: the default for this file first, then its weights with
    the other activations where they apply (native), then every other weight format."""
    from agent.decoder.engine import source_tensor_types
    from agent.decoder.kernels import ACTIVATIONS
    from agent.decoder.quantize import WEIGHT_FORMATS, resolve_weights

    default = resolve_weights(settings.llm_weights, source_tensor_types(path))
    others = [replace(settings, llm_activations=a) for a in ACTIVATIONS
              if a != settings.llm_activations] if default == "native" else []
    return [settings, *others,
            *(replace(settings, llm_weights=w) for w in WEIGHT_FORMATS if w != default)]


def bench_quality(settings: Settings, args: argparse.Namespace) -> int:
    from agent.decoder.engine import load_engine

    model_name = getattr(args, "model", None) or settings.llm_model
    quick = bool(getattr(args, "quick", False))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    threads = torch.get_num_threads()
    print(f"quality of {model_name}: {len(QUESTIONS)} questions per configuration", flush=True)

    fp32 = load_engine(model_name, settings=settings, backend="fp32", progress=False)
    tokenizer, path = fp32.tokenizer, fp32.path
    prompts = [fp32.encode_prompt(p) for p in AGREEMENT_PROMPTS]
    source = "checkpoint" if path.is_dir() else "dequantised GGUF"
    results = [_measure(f"PyTorch fp32 ({source})", _parley_greedy(fp32), tokenizer,
                        None, None, prompts)]
    reference = results[0].continuations
    margins = [_fp32_margins(fp32, p, c) for p, c in zip(prompts, reference, strict=True)]
    _report(results[-1])
    del fp32
    gc.collect()

    configurations = _configurations(settings, path)
    for number, configuration in enumerate(configurations[:1] if quick else configurations):
        engine = load_engine(model_name, settings=configuration, progress=False)
        label = f"Parley {engine.backend} / {engine.weights} × {engine.activations}"
        if number == 0:
            label += " (default)"
        results.append(_measure(label, _parley_greedy(engine), tokenizer, reference,
                                margins, prompts))
        _report(results[-1])
        del engine
        gc.collect()
        torch.set_num_threads(threads)

    llama = (None if path.is_dir() else
             _llama_result(path, tokenizer, reference, margins, prompts, threads))
    if llama is not None:
        results.append(llama)
        _report(llama)
    elif path.is_dir():
        print("  llama.cpp: it reads GGUF files, not checkpoint folders; no comparison row",
              flush=True)
    else:
        print("  llama.cpp: llama-cpp-python is not installed; no comparison row", flush=True)

    counts = {g: sum(q.group == g for q in QUESTIONS) for g in GROUPS}
    header = (f"### Answer quality: {model_name} ({path.name})\n\n"
              f"{stamp}; {_machine()}. {len(QUESTIONS)} questions "
              f"({', '.join(f'{n} {g}' for g, n in counts.items())}) at temperature 0, "
              f"rendered with the chat template and a system prompt, at most "
              f"{ANSWER_TOKENS} tokens per answer; greedy agreement over "
              f"{len(prompts)} fixed prompts of up to {AGREEMENT_TOKENS} tokens (fp32's "
              f"length, to its end of generation, after the slash). `parley bench quality`"
              f"{' --quick' if quick else ''}.")
    print()
    print(render(results, header))
    if getattr(args, "verbose", False):
        _print_replies(results)
    return 0


def _llama_result(path: Path, tokenizer, reference, margins, prompts, threads: int,
                  ) -> Result | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    try:
        return _measure(f"llama.cpp {llama_cpp.__version__} / the file's × int8",
                        _llama_greedy(llm, tokenizer.eog_ids), tokenizer, reference, margins,
                        prompts)
    finally:
        llm.close()


def _report(result: Result) -> None:
    agree = statistics.mean(result.agreement) if result.agreement else 0.0
    print(f"  {result.name}: {result.right}/{result.asked} right, mean agreement "
          f"{agree:.1f} tokens, {result.seconds:.0f} s", flush=True)


def _print_replies(results: list[Result]) -> None:
    print()
    for n, question in enumerate(QUESTIONS):
        print(f"- {question.text}")
        for r in results:
            mark = "✓" if correct(question, r.replies[n]) else "✗"
            print(f"    {mark} {r.name}: {r.replies[n].strip()[:100]!r}")
