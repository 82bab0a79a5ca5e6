"""`parley bench tools`: tool calls under the grammar, scored on customer-support requests.

For each bundled LLM that is installed, every case of `agent.bench.tools_cases` goes
through the real decoder as chat sends it: the prompt rendered by the chat pipeline with
the 9 built-in tools (search, booking, payments) offered, the llguidance grammar as the
token mask, greedy decoding. Reported per model:

    schema-valid rate     every produced call's arguments validated with jsonschema
                          (formats checked too) against that tool's parameters: must be 100%
    exact-call accuracy   exactly one call, right function, right arguments (see tools_cases),
                          with tool_choice "auto" and parallel calls on (a server's defaults),
                          and again for the call cases with "required" and one call
    right function        exactly one call, to the expected tool
    decision accuracy     under "auto": text when text is right, a call when a call is
    tokens per reply      completion tokens (a text reply is stopped at TEXT_CAP)
    grammar overhead      time in the mask function per token (µs), the sampler applying the
                          mask, the grammar's build per request, and decode tok/s with and
                          without the grammar, back to back on the same prompts
    stress                every case at temperatures 0.7 and 1.2 with tool_choice "required"
                          and one call (every reply is a call), counting schema validity only

All cases of a model share one decoder session, so the long common prefix (the system
message with the tools, ~2,100 tokens) is prefilled once and each case prefills only its
own turn; the chat endpoint would prefill it every time, which changes the time, not the
tokens. Prints one Markdown table per model, for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from agent.bench.speech import _machine
from agent.bench.tools_cases import CASES, Case, score
from agent.config import Settings
from agent.errors import ModelMissingError

SYSTEM = ("You are the customer-support assistant of Harbour Kitchen, a restaurant with an "
          "online shop. Today is 2026-11-29.")
MAX_TOKENS = 200
TEXT_CAP = 48  # tokens of a text reply generated before it is stopped (see generate)
PLAIN_TOKENS = 64  # tokens per decode-rate sample, with and without the grammar
STRESS_TEMPERATURES = (0.7, 1.2)
SESSION = "bench-tools"


def _is_call(text: str) -> bool:
    """A reply under the grammar is a call when it opens with a tag or a bare JSON call."""
    from agent.decoder.grammar import CALL_OPEN

    return CALL_OPEN in text or text.lstrip().startswith("{")


def offered_tools() -> list[dict[str, Any]]:
    """The built-in backends' tools as a dispatcher offers them (every group, the bundled
    knowledge base), opened on throw-away storage."""
    from agent.dispatch.catalog import builtin_specs
    from agent.dispatch.config import ToolsConfig
    from agent.dispatch.registry import ToolRegistry

    with tempfile.TemporaryDirectory(prefix="parley-bench-tools-") as folder:
        return ToolRegistry(builtin_specs(ToolsConfig(data_dir=Path(folder)))).openai_tools()


class TimedMask:
    """A mask hook that records how long each call of the wrapped one takes."""

    def __init__(self, inner: Callable[[Sequence[int]], torch.Tensor | None]):
        self.inner = inner
        self.seconds: list[float] = []

    def __call__(self, generated: Sequence[int]) -> torch.Tensor | None:
        began = time.perf_counter()
        mask = self.inner(generated)
        self.seconds.append(time.perf_counter() - began)
        return mask


@dataclass
class Generation:
    text: str
    tokens: int
    finish: str
    decode_s: float  # from the first token to the last

    @property
    def decode_rate(self) -> float | None:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s else None


@dataclass
class CaseRun:
    case: Case
    generation: Generation
    calls: list[tuple[str, dict[str, Any]]]
    invalid: list[str]  # what was wrong with each call that failed its schema
    cut_off: bool  # a call was still open when max_tokens ran out
    prompt_tokens: int
    mask_s: list[float] = field(default_factory=list)


@dataclass
class ModelReport:
    name: str
    path: Path
    backend: str
    tools: int
    runs: list[CaseRun] = field(default_factory=list)  # tool_choice auto, every case
    forced: list[CaseRun] = field(default_factory=list)  # "required", one call, call cases
    plain: list[tuple[Generation, Generation]] = field(default_factory=list)  # without, with
    build_ms: list[float] = field(default_factory=list)
    apply_us: float = 0.0  # sampling.apply_mask on logits of this vocabulary, per token
    stress: dict[float, list[CaseRun]] = field(default_factory=dict)


class ToolBench:
    """One model's scheduler, its rendered prompts and the tools' validators."""

    def __init__(self, settings: Settings, name: str, scheduler: Any,
                 tools: list[dict[str, Any]]):
        from agent.json_schema import make_validator

        self.name = name
        self.settings = dataclasses.replace(settings, llm_model=name)  # so chat accepts it
        self.scheduler = scheduler
        self.tools = tools
        self.validators = {t["function"]["name"]: make_validator(t["function"]["parameters"])
                           for t in tools}

    def request(self, case: Case, choice: str, temperature: float, seed: int | None,
                parallel: bool = True) -> Any:
        from agent.chat.request import parse_chat_request

        body = {"model": self.name, "tools": self.tools, "parallel_tool_calls": parallel,
                "tool_choice": choice, "temperature": temperature, "seed": seed,
                "max_completion_tokens": MAX_TOKENS,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": case.request}]}
        return parse_chat_request(body, self.settings, ())

    def prompt(self, request: Any) -> list[int]:
        from agent.chat.pipeline import _prompt_ids  # the chat endpoint's own rendering

        return _prompt_ids(self.scheduler, request.messages, request)

    async def generate(self, prompt: list[int], params: Any,
                       text_cap: int | None = None) -> Generation:
        """One reply; with `text_cap`, a reply that is text (not a call) stops after that
        many tokens: it is scored by its first token, and a rambling one costs minutes."""
        from agent.decoder.scheduler import GenerationRequest

        first = last = 0.0
        parts: list[str] = []
        tokens, finish = 0, "stop"
        stream = self.scheduler.generate(
            GenerationRequest(prompt_ids=prompt, params=params, session_id=SESSION))
        try:
            async for delta in stream:
                last = time.perf_counter()
                first = first or last
                parts.append(delta.text)
                tokens += 1
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                    tokens = delta.usage.completion_tokens if delta.usage else tokens
                elif text_cap and tokens >= text_cap and not _is_call("".join(parts)):
                    finish = "capped"
                    break
        finally:
            await stream.aclose()
        return Generation("".join(parts), tokens, finish, last - first)

    async def run_case(self, case: Case, choice: str, temperature: float = 0.0,
                       seed: int | None = None, *, parallel: bool = True,
                       max_tokens: int = MAX_TOKENS) -> tuple[CaseRun, float]:
        """The case under the grammar, and the grammar's build time."""
        from agent.decoder.grammar import (
            CALL_OPEN,
            ToolCallGrammar,
            parse_tool_calls,
        )

        request = self.request(case, choice, temperature, seed, parallel)
        prompt = await asyncio.to_thread(self.prompt, request)
        began = time.perf_counter()
        grammar = await asyncio.to_thread(
            ToolCallGrammar, self.scheduler.engine.tokenizer, request.tools,
            choice=request.tool_mode, parallel=request.parallel_tool_calls)
        mask = TimedMask(grammar.mask_fn())
        build_s = time.perf_counter() - began
        params = replace(request.sampling(0), max_tokens=max_tokens, mask_fn=mask)
        generation = await self.generate(prompt, params, TEXT_CAP if choice == "auto" else None)
        _, parsed = parse_tool_calls(generation.text)
        calls = [(c.name, json.loads(c.arguments)) for c in parsed]
        invalid = [self.problem(name, args) for name, args in calls]
        text = generation.text
        cut_off = generation.finish == "length" and (
            text.count(CALL_OPEN) > text.count("</tool_call>") or text.lstrip().startswith("{"))
        return (CaseRun(case, generation, calls, [p for p in invalid if p], cut_off,
                        len(prompt), mask.seconds), build_s)

    def problem(self, name: str, arguments: Any) -> str:
        """'' when the call is valid for its tool, else what is wrong."""
        validator = self.validators.get(name)
        if validator is None:
            return f"{name}: not an offered tool"
        errors = sorted(validator.iter_errors(arguments), key=str)
        return f"{name}: {errors[0].message}" if errors else ""


def bench_tools(settings: Settings, args: argparse.Namespace) -> int:
    from agent.assets import MODELS, resolve

    quick = bool(getattr(args, "quick", False))
    wanted = getattr(args, "model", None)
    names = [wanted] if wanted else [s.name for s in MODELS.values() if s.role == "llm"]
    tools = offered_tools()
    print(f"benchmarking tool calls ({'quick' if quick else 'full'} run): {len(CASES)} cases, "
          f"{len(tools)} tools offered", flush=True)
    reports: list[ModelReport] = []
    for name in names:
        try:
            if name in MODELS:
                resolve(name, settings.cache_dir)
        except ModelMissingError as exc:
            print(f"  {name}: skipped, not installed ({exc.message})", flush=True)
            continue
        reports.append(asyncio.run(_bench_model(settings, name, tools, quick)))
    header = (f"Measured {datetime.date.today().isoformat()} on {_machine()}, torch "
              f"{torch.__version__}{', --quick' if quick else ''}.")
    print()
    print(header)
    for report in reports:
        print()
        print(render(report))
    return 1 if any(run.invalid for r in reports for run in _all_runs(r)) else 0


async def _bench_model(settings: Settings, name: str, tools: list[dict[str, Any]],
                       quick: bool) -> ModelReport:
    from agent.bench.decoder import _use_kernel_threads
    from agent.decoder.engine import load_engine
    from agent.decoder.scheduler import Scheduler

    threads = torch.get_num_threads()
    if settings.llm_backend != "fp32":
        _use_kernel_threads(settings, threads)
    engine = await asyncio.to_thread(load_engine, name, settings=settings,
                                     backend=settings.llm_backend)
    scheduler = Scheduler(engine, max_streams=1)
    bench = ToolBench(settings, name, scheduler, tools)
    report = ModelReport(name, engine.path, engine.backend, len(tools))
    print(f"  {name}: loaded ({engine.backend} backend) in {engine.load_seconds:.1f} s",
          flush=True)
    try:
        await _accuracy(bench, report)
        report.apply_us = _apply_mask_us(engine.args.vocab_size)
        await _plain_rates(bench, report, quick)
        await _stress(bench, report, quick)
    finally:
        scheduler.close()
        torch.set_num_threads(threads)
    return report


async def _accuracy(bench: ToolBench, report: ModelReport) -> None:
    from agent.decoder.sampling import SamplingParams

    # Prefill the shared prefix (system message and tools) once, outside the timings.
    request = bench.request(CASES[0], "auto", 0.0, None)
    prompt = await asyncio.to_thread(bench.prompt, request)
    began = time.perf_counter()
    await bench.generate(prompt, SamplingParams(max_tokens=1))
    print(f"  prompt of {len(prompt)} tokens prefilled in {time.perf_counter() - began:.1f} s",
          flush=True)
    for case in CASES:
        run, build_s = await bench.run_case(case, "auto")
        report.runs.append(run)
        report.build_ms.append(1000 * build_s)
        print(f"  auto     {_line(run)}", flush=True)
    for case in CASES:
        if case.tool is not None:
            run, _ = await bench.run_case(case, "required", parallel=False)
            report.forced.append(run)
            print(f"  required {_line(run)}", flush=True)


def _apply_mask_us(vocab: int, repeats: int = 200) -> float:
    """Median µs of the sampler putting a grammar's mask on one row of logits: part of the
    grammar's cost per token that the mask function's own time leaves out."""
    from agent.decoder.sampling import apply_mask

    logits = torch.randn(vocab)
    mask = torch.rand(vocab) < 0.01  # [vocab]: a JSON position allows a few hundred tokens
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        apply_mask(logits, mask)
        times.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times)


async def _plain_rates(bench: ToolBench, report: ModelReport, quick: bool) -> None:
    """Decode rate with and without the grammar, back to back on the same prompts (the
    first case of each tool), each limited to PLAIN_TOKENS: the same work but the mask."""
    from agent.decoder.sampling import SamplingParams

    cases = list({c.tool: c for c in CASES if c.tool}.values())[:3 if quick else None]
    for case in cases:
        request = bench.request(case, "auto", 0.0, None)
        prompt = await asyncio.to_thread(bench.prompt, request)
        plain = await bench.generate(prompt, SamplingParams(max_tokens=PLAIN_TOKENS))
        run, _ = await bench.run_case(case, "required", max_tokens=PLAIN_TOKENS)
        report.plain.append((plain, run.generation))


async def _stress(bench: ToolBench, report: ModelReport, quick: bool) -> None:
    """Every case (quick: one per tool and one text) at each temperature, forced to make
    exactly one call, so every reply is a call to check."""
    cases = list({c.tool: c for c in CASES}.values()) if quick else list(CASES)
    for temperature in STRESS_TEMPERATURES[-1:] if quick else STRESS_TEMPERATURES:
        runs = report.stress.setdefault(temperature, [])
        for seed, case in enumerate(cases):
            run, _ = await bench.run_case(case, "required", temperature, seed, parallel=False)
            runs.append(run)
            for problem in run.invalid:
                print(f"  INVALID at t={temperature}: {problem}", flush=True)
        calls = sum(len(r.calls) for r in runs)
        print(f"  stress t={temperature}: {len(runs)} replies, {calls} calls", flush=True)


def _line(run: CaseRun) -> str:
    verdict = score(run.case, run.calls)
    mark = "✓" if verdict.exact else ("~" if verdict.right_function else "✗")
    said = ("; ".join(f"{n} {json.dumps(a, ensure_ascii=False)}" for n, a in run.calls)
            or f"text: {run.generation.text.strip()!r}")
    extra = " [INVALID: " + "; ".join(run.invalid) + "]" if run.invalid else ""
    return f"{mark} {run.case.id:<16} {said[:110]}{extra}"


def _all_runs(report: ModelReport) -> list[CaseRun]:
    return report.runs + report.forced + [r for runs in report.stress.values() for r in runs]


# --- report -------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}% ({part} of {whole})" if whole else "— (none)"


def _validity(runs: Sequence[CaseRun]) -> str:
    calls = sum(len(r.calls) for r in runs)
    return _pct(calls - sum(len(r.invalid) for r in runs), calls)


def render(report: ModelReport) -> str:
    scores = [score(r.case, r.calls) for r in report.runs]
    expecting = [s for s, r in zip(scores, report.runs, strict=True) if r.case.tool]
    forced = [score(r.case, r.calls) for r in report.forced]
    sizes = [r.prompt_tokens for r in report.runs] or [0]
    masks = sorted(t for r in _all_runs(report) for t in r.mask_s)
    mean_mask = 1e6 * statistics.fmean(masks) if masks else 0.0
    p95 = 1e6 * masks[int(0.95 * (len(masks) - 1))] if masks else 0.0
    plain = sum(p.tokens - 1 for p, _ in report.plain) / max(
        1e-9, sum(p.decode_s for p, _ in report.plain))
    with_grammar = sum(g.tokens - 1 for _, g in report.plain) / max(
        1e-9, sum(g.decode_s for _, g in report.plain))
    paired = [g.decode_rate / p.decode_rate for p, g in report.plain
              if g.decode_rate and p.decode_rate]
    ratio = statistics.median(paired) if paired else 0.0
    stress = " / ".join(f"t={t}: {_validity(runs)}" for t, runs in report.stress.items())
    cut = sum(r.cut_off for r in _all_runs(report))
    rows = [
        ("schema-valid calls, temperature 0 (must be 100%)",
         _validity(report.runs + report.forced)),
        ("schema-valid calls, stress (tool_choice required, one call)", stress or "—"),
        ("exact call (right function and arguments), auto", _pct(
            sum(s.exact for s in expecting), len(expecting))),
        ("exact call, tool_choice required (one call)",
         _pct(sum(s.exact for s in forced), len(forced))),
        ("right function, auto / required", _pct(
            sum(s.right_function for s in expecting), len(expecting)) + " / " + _pct(
            sum(s.right_function for s in forced), len(forced))),
        ("text-vs-call decision", _pct(sum(s.decided_right for s in scores), len(scores))),
        (f"mean completion tokens per reply (text stopped at {TEXT_CAP})",
         f"{statistics.fmean(r.generation.tokens for r in report.runs):.1f}"),
        ("grammar mask per token, mean / p95 (share of a decode step)",
         f"{mean_mask:.0f} µs / {p95:.0f} µs ({mean_mask * with_grammar / 1e4:.1f}%)"),
        ("mask put on the logits by the sampler, per token (median)",
         f"{report.apply_us:.0f} µs"),
        (f"decode tok/s without / with grammar ({len(report.plain)} prompts, "
         f"{PLAIN_TOKENS} tokens; median paired ratio)",
         f"{plain:.1f} / {with_grammar:.1f} ({ratio:.2f}×)"),
        (f"grammar build per request ({report.tools} tools), median",
         f"{statistics.median(report.build_ms):.0f} ms" if report.build_ms else "—"),
        ("replies cut off inside a call by max_tokens", str(cut)),
    ]
    lines = [f"### Tool calls: {report.name} ({report.path.name}, {report.backend} backend)",
             "", f"{len(report.runs)} requests ({len(expecting)} expecting a call) with "
             f"tool_choice auto, the {len(forced)} call requests again with tool_choice "
             f"required and parallel_tool_calls off; greedy, max {MAX_TOKENS} tokens, "
             f"prompts of {min(sizes)}–{max(sizes)} tokens with the tools.", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
