"""Single-stream generation with the real SmolLM2: answers, stops, limits, seeds, masks."""

from __future__ import annotations

import pytest
import torch

from agent.decoder.generate import Delta, generate
from agent.decoder.sampling import SamplingParams
from tests.decoder_fixtures import QUESTION, fp32_engine


@pytest.fixture(scope="module")
def engine():
    return fp32_engine("smollm2")


def run(engine, prompt: list[int], **kwargs) -> list[Delta]:
    return list(generate(engine.model, engine.tokenizer, prompt, SamplingParams(**kwargs)))


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.fixture(scope="module")
def story(engine) -> tuple[list[int], str]:
    """A greedy continuation of a raw prompt, long enough to cut with a stop string."""
    prompt = engine.tokenizer.encode("Once upon a time, in a small village,")
    return prompt, text_of(run(engine, prompt, max_tokens=16))


def test_answers_the_capital_of_france(engine):
    deltas = run(engine, engine.tokenizer.encode_chat(QUESTION), max_tokens=20)
    assert "Paris" in text_of(deltas)
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert last.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_max_tokens_ends_with_length(engine, story):
    prompt, _ = story
    deltas = run(engine, prompt, max_tokens=5)
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.completion_tokens == 5


def test_stop_string_cuts_the_text_and_never_leaks(engine, story):
    prompt, full = story
    words = full.split(" ")
    assert len(words) > 4, full
    stop = " " + words[3][:3]  # starts mid-continuation; may span tokens
    deltas = run(engine, prompt, max_tokens=16, stop=(stop,))
    out = text_of(deltas)
    assert out == full[:full.find(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_same_seed_same_text_and_seeds_differ(engine, story):
    prompt, _ = story
    sample = {"temperature": 1.5, "max_tokens": 6}
    first = text_of(run(engine, prompt, seed=7, **sample))
    assert text_of(run(engine, prompt, seed=7, **sample)) == first
    assert text_of(run(engine, prompt, seed=8, **sample)) != first


def test_mask_hook_is_honoured_every_step(engine):
    tok = engine.tokenizer
    digits = torch.zeros(engine.args.vocab_size, dtype=torch.bool)
    for i in range(tok.vocab_size):
        piece = tok.token_bytes(i)
        digits[i] = bool(piece) and piece.isdigit()
    calls: list[int] = []

    def only_digits(generated):
        calls.append(len(generated))
        return digits

    deltas = run(engine, tok.encode_chat(QUESTION), max_tokens=6, mask_fn=only_digits)
    text = text_of(deltas)
    assert text.isdigit() and len(deltas) == 6
    assert calls == list(range(6))


def test_a_full_context_ends_with_length_not_a_crash(engine, story):
    prompt, _ = story
    cache = engine.model.new_cache(1, len(prompt) + 3)
    deltas = list(generate(engine.model, engine.tokenizer, prompt,
                           SamplingParams(max_tokens=50), cache=cache))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.completion_tokens <= 4


def test_parley_generate_streams_the_answer(capsys):
    from agent.cli import main

    code = main(["generate", "What is the capital of France?", "--backend", "fp32",
                 "--max-tokens", "12"])
    out = capsys.readouterr()
    assert code == 0 and "Paris" in out.out
    assert "prompt tokens" in out.err


def test_parley_generate_rejects_an_unknown_model(capsys):
    from agent.cli import main

    assert main(["generate", "hi", "--model", "no-such-model", "--backend", "fp32"]) == 2
    assert "no-such-model" in capsys.readouterr().err
