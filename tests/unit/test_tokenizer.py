"""Tokenizer and chat template: llama.cpp's ids, lossless text, UTF-8-safe streaming."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decoder.gguf_loader import read_metadata
from agent.decoder.tokenizer import Tokenizer
from agent.errors import InvalidRequestError
from tests.decoder_fixtures import gguf_path, llama_cpp_token_cases

MODELS = ("smollm2", "qwen2.5-coder-0.5b")


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(gguf_path(name)))


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return tokenizer("smollm2")


@pytest.mark.parametrize("name", MODELS)
def test_ids_equal_llama_cpp_on_the_fixture_strings(name):
    tok = tokenizer(name)
    cases = llama_cpp_token_cases(name)
    assert len(cases) >= 5
    mismatches = []
    for case in cases:
        got = tok.encode(case["text"], special=case["special"])
        if got != case["ids"]:
            mismatches.append((case["text"], case["special"], got, case["ids"]))
    assert not mismatches, mismatches[:3]


# SmolLM2's vocabulary lacks a few byte tokens (six control characters and the lead bytes
# of U+40000 and above); llama.cpp drops such bytes too, so they cannot round-trip.
_NO_BYTE_TOKEN = "\x04\x06\x13\x14\x16\x1d"
texts = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x3FFFF,
                              blacklist_characters=_NO_BYTE_TOKEN), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_plain_text_round_trips(text):
    tok = tokenizer("smollm2")
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_stream_decoder_never_splits_a_character(text):
    tok = tokenizer("smollm2")
    decoder = tok.stream_decoder()
    deltas = [decoder.feed(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_multibyte_characters_split_across_tokens_are_held_back(smol):
    text = "naïve 日本語 🙂🚀 ok"
    ids = smol.encode(text)
    pieces = [smol.token_bytes(i) for i in ids]
    assert any(not _valid_utf8(p) for p in pieces), "want a token holding half a character"
    decoder = smol.stream_decoder()
    deltas = [decoder.feed(i) for i in ids]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_control_tokens_only_with_special(smol):
    text = "<|im_start|>user\nhi<|im_end|>"
    start, end = smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")
    special = smol.encode(text, special=True)
    assert special[0] == start and special[-1] == end
    plain = smol.encode(text)
    assert start not in plain and end not in plain
    assert smol.decode(plain) == text
    assert smol.decode(special) == "user\nhi"  # control tokens are not text
    assert end in smol.eog_ids


def test_qwen_tool_call_tags_are_single_tokens_even_without_special():
    tok = tokenizer("qwen2.5-coder-0.5b")
    ids = tok.encode('<tool_call>\n{"name": "f"}\n</tool_call>')
    assert ids[0] == tok.token_to_id("<tool_call>")
    assert ids[-1] == tok.token_to_id("</tool_call>")
    assert tok.decode(ids).startswith("<tool_call>")


def test_smollm_digits_are_split_one_by_one(smol):
    ids = smol.encode("12345")
    assert len(ids) == 5 and smol.decode(ids) == "12345"


def test_smollm_template_adds_its_default_system_prompt(smol):
    text = smol.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = smol.render_chat([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"}])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = smol.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == smol.token_to_id("<|im_start|>")


def test_qwen_template_renders_tools_and_tool_calls():
    tok = tokenizer("qwen2.5-coder-0.5b")
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18°C, sunny"},
    ]
    text = tok.render_chat(messages, tools=[tool])
    assert "# Tools" in text and json.dumps(tool, ensure_ascii=False) in text
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    assert "<tool_response>\n18°C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "# Tools" not in tok.render_chat(messages[:1])


def test_content_parts_are_joined(smol):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert "Hello there" in smol.render_chat([{"role": "user", "content": parts}])


@pytest.mark.parametrize("messages", [[], [{"content": "no role"}], ["not a dict"],
                                      [{"role": "user", "content": 5}]])
def test_malformed_messages_are_invalid_requests(smol, messages):
    with pytest.raises(InvalidRequestError):
        smol.render_chat(messages)


def test_template_raise_exception_is_an_invalid_request():
    tok = tokenizer("smollm2").with_chat_template(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first message must be the user') }}{% endif %}ok")
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="first message must be the user"):
        tok.render_chat([{"role": "assistant", "content": "x"}])
