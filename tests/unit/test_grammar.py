"""The tool grammar: every call it lets through parses and validates, whatever the model
prefers. The "model" here is random logits sampled by the real `Sampler` at several
temperatures (arbitrary preferences are the hard case for a grammar: a real model's are
one of them); the real chat path with real models is covered in tests/e2e."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.assets import resolve
from agent.config import load_settings
from agent.decoder.gguf_loader import read_header
from agent.decoder.grammar import CALL_CLOSE, ToolCallGrammar, parse_tool_calls
from agent.decoder.sampling import Sampler, SamplingParams
from agent.decoder.tokenizer import Tokenizer
from agent.errors import InvalidRequestError

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    meta, _ = read_header(resolve("smollm2", load_settings().cache_dir))
    return Tokenizer.from_metadata(meta)


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


_names = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
_leaves = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(lambda vs: {"type": "string", "enum": vs},
              st.lists(st.text("abcxyz -", min_size=1, max_size=6), min_size=1, max_size=4,
                       unique=True)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 5000)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(1, 100)),
    st.just({"type": "boolean"}),
    st.just({"type": "string", "format": "date"}),
    st.just({"type": "string", "format": "email", "maxLength": 24}),
    st.just({"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}),
)


def _object(children):
    return st.builds(
        lambda props, required_mask: {
            "type": "object", "properties": props,
            "required": [k for k, r in zip(props, required_mask, strict=False) if r]},
        st.dictionaries(_names, children, min_size=1, max_size=4),
        st.lists(st.booleans(), min_size=4, max_size=4))


_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda item, lo, span: {"type": "array", "items": item, "minItems": lo,
                                          "maxItems": lo + span},
                  children, st.integers(0, 2), st.integers(0, 2))),
    max_leaves=6)
_schemas = _object(_values)


def _sample(grammar: ToolCallGrammar, tokenizer: Tokenizer, temperature: float,
            seed: int, parallel: bool) -> str:
    mask_fn = grammar.mask_fn()
    sampler = Sampler(SamplingParams(temperature=temperature, seed=seed, mask_fn=mask_fn))
    noise = torch.Generator().manual_seed(seed)
    generated: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = torch.randn(tokenizer.vocab_size, generator=noise) * 4  # [vocab]
        token = sampler(logits, generated)
        if token in tokenizer.eog_ids:
            return tokenizer.decode(generated)
        generated.append(token)
        text = tokenizer.decode(generated)
        if text and not text.startswith("<"):
            return text  # `auto` chose plain text: free text has no end to wait for
    text = tokenizer.decode(generated)
    if parallel and CALL_CLOSE in text:
        # Random logits may go on calling: the complete calls are what is checked.
        return text
    pytest.fail(f"no end after {MAX_TOKENS} tokens: {tokenizer.decode(generated)!r}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas=st.lists(_schemas, min_size=1, max_size=3),
       temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**31),
       pick=st.integers(0, 2), parallel=st.booleans())
def test_every_call_is_valid(tokenizer, schemas, temperature, seed, pick, parallel):
    tools = [_tool(f"tool_{i}", s) for i, s in enumerate(schemas)]
    choice = ["required", "auto", tools[seed % len(tools)]["function"]["name"]][pick]
    grammar = ToolCallGrammar(tokenizer, tools, choice=choice, parallel=parallel)
    text = _sample(grammar, tokenizer, temperature, seed, parallel)
    head, calls = parse_tool_calls(text)
    if choice != "auto":
        assert head == "" and calls, text
    if not calls:
        assert not head.startswith(("<", "{"))
    if not parallel:
        assert len(calls) <= 1
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        if choice not in ("auto", "required"):
            assert call.name == choice
        checker = jsonschema.Draft202012Validator(
            by_name[call.name], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        checker.validate(json.loads(call.arguments))


def test_unknown_named_tool_is_a_request_error(tokenizer):
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        ToolCallGrammar(tokenizer, [_tool("a", {"type": "object"})], choice="b")


def test_text_and_calls_come_apart(tokenizer):
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>')
    head, calls = parse_tool_calls(text)
    assert head == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1})]
    assert parse_tool_calls("plain answer") == ("plain answer", [])


@pytest.mark.parametrize("seed", range(5))
def test_none_allows_words_only(tokenizer, seed):
    """tool_choice "none" after calls in the conversation: the reply cannot be a call."""
    grammar = ToolCallGrammar(tokenizer, [_tool("a", {"type": "object"})], choice="none")
    text = _sample(grammar, tokenizer, 1.0, seed, parallel=False)
    assert parse_tool_calls(text) == (text, [])
    assert not text.startswith(("<", "{"))


def test_a_bare_json_call_is_a_call(tokenizer):
    """Under auto, `{"name": ..., "arguments": ...}` is read as a call, streamed or whole."""
    from agent.chat.tool_stream import ToolStream

    text = '{"name": "a", "arguments": {"x": 1}}'
    assert parse_tool_calls(text)[1] == [parse_tool_calls(
        f'<tool_call>\n{text}\n</tool_call>')[1][0]]
    stream = ToolStream()
    fragments = []
    for piece in ('{"name": "a", "arg', 'uments": {"x"', ': 1}}'):
        shown, got = stream.push(piece)
        assert shown == ""
        fragments += got
    fragments += stream.finish()
    assert fragments[0].name == "a" and fragments[0].id
    assert "".join(f.arguments for f in fragments) == '{"x": 1}'


def test_auto_grammar_accepts_a_bare_call(tokenizer):
    grammar = ToolCallGrammar(tokenizer, [_tool("a", {"type": "object", "properties": {
        "x": {"type": "integer"}}, "required": ["x"]})], choice="auto")
    mask = grammar.mask_fn()
    ids = tokenizer.encode('{"name": "a", "arguments": {"x": 1}}')
    for i in range(len(ids)):
        assert mask(ids[:i])[ids[i]], tokenizer.decode(ids[:i + 1])
    assert set(torch.nonzero(mask(ids)).flatten().tolist()) <= set(tokenizer.eog_ids)


def test_the_date_pattern_is_exactly_the_dates_that_exist() -> None:
    """Every day string of a few years (leap, century, 400-year, the ends of the range)
    matches DATE_PATTERN exactly when Python's date parser, the schema's format check,
    accepts it: no 29 February outside leap years, no day 31 in a 30-day month."""
    import datetime
    import re

    from agent.decoder.grammar import DATE_PATTERN

    pattern = re.compile(DATE_PATTERN)
    for year in ("0000", "0001", "0004", "0100", "0400", "1900", "2000", "2023", "2024",
                 "5922", "9999"):
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year}-{month:02d}-{day:02d}"
                try:
                    datetime.date.fromisoformat(text)
                    exists = True
                except ValueError:
                    exists = False
                assert bool(pattern.fullmatch(text)) == exists, text


def test_date_formats_become_the_exact_pattern_in_the_grammar() -> None:
    from agent.decoder.grammar import DATE_PATTERN, exact_dates

    schema = {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"},
        "days": {"type": "array", "items": {"type": "string", "format": "date"}},
        "own": {"type": "string", "format": "date", "pattern": "^2026-"}}}
    out = exact_dates(schema)
    assert out["properties"]["day"] == {"type": "string", "pattern": DATE_PATTERN}
    assert out["properties"]["days"]["items"]["pattern"] == DATE_PATTERN
    assert out["properties"]["own"] == schema["properties"]["own"]  # its own pattern stays
    assert schema["properties"]["day"]["format"] == "date"  # the caller's schema untouched
