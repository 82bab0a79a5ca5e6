"""`parley generate "PROMPT"`: stream a reply from the language model to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from agent.config import Settings


def generate_command(settings: Settings, args: argparse.Namespace) -> int:
    from agent.decoder.engine import load_engine
    from agent.decoder.generate import generate
    from agent.decoder.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
    engine = load_engine(args.model, settings=settings,
                         backend=args.backend or settings.llm_backend)
    print(f"[{engine.name}: {engine.backend} backend, loaded in {engine.load_seconds:.1f} s]",
          file=sys.stderr)
    prompt = engine.encode_prompt(args.prompt, raw=args.raw, system=args.system)
    began = time.perf_counter()
    first = None
    usage = None
    for delta in generate(engine.model, engine.tokenizer, prompt, params):
        first = first or time.perf_counter()
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        usage = delta.usage
    sys.stdout.write("\n")
    if usage is not None and first is not None:
        decode_s = max(time.perf_counter() - first, 1e-9)
        rate = (usage.completion_tokens - 1) / decode_s if usage.completion_tokens > 1 else 0.0
        print(f"[{usage.prompt_tokens} prompt tokens, first token after "
              f"{first - began:.2f} s, {usage.completion_tokens} tokens, {rate:.1f} tok/s]",
              file=sys.stderr)
    return 0
