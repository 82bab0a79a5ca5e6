"""Tool calls the decoder cannot get wrong: an llguidance grammar turned into a token mask.

    grammar = ToolCallGrammar(tokenizer, tools, choice="required", parallel=False)
    params = SamplingParams(..., mask_fn=grammar.mask_fn())   # one mask_fn per stream

The output format is Qwen2.5's native one, used for every model (SmolLM2's template has no
tools branch, so Parley describes the tools and this same format in a system message):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The arguments are generated under `%json` with that tool's `parameters` schema and no free
whitespace (a small model would otherwise spend its budget on spaces), so every call
parses and validates. `choice`: "auto" (plain text, which may not start with "<" or "{",
or calls — tagged, or one bare JSON call object), "required" (calls only), a tool name
(a call to that tool only), or "none" (plain text only: a model that has seen calls in
the conversation may not write one). With
`parallel`, several calls may follow each other, separated by a newline.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np
import torch

from agent.decoder.sampling import MaskFn
from agent.decoder.tokenizer import USER_DEFINED, Tokenizer
from agent.errors import InvalidRequestError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Separators as Python's json.dumps writes them: what Qwen2.5 saw in training.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Plain text, parting from a call at the first byte (see `_lark`).
_TEXT = "TEXT: /[^<{](.|\\n)*/"

_lock = threading.Lock()
_ll_tokenizers: dict[int, tuple[Tokenizer, llg.LLTokenizer]] = {}


def ll_tokenizer(tokenizer: Tokenizer) -> llg.LLTokenizer:
    """llguidance's view of our tokenizer, built once per tokenizer (it takes seconds)."""
    with _lock:
        hit = _ll_tokenizers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        built = llg.LLTokenizer(tokenizer.hf_tokenizer.to_str(), n_vocab=tokenizer.vocab_size,
                                eos_token=sorted(tokenizer.eog_ids))
        _ll_tokenizers[id(tokenizer)] = (tokenizer, built)
        return built


def native_tool_template(tokenizer: Tokenizer) -> bool:
    """Whether the model's own chat template renders `tools` (Qwen2.5 does, SmolLM2 not)."""
    source = tokenizer.vocab.chat_template or ""
    return "tools" in source and CALL_OPEN in source


def tool_name(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    return _closed(schema)


def _closed(schema: Any) -> Any:
    """The schema with objects that leave `additionalProperties` open closed, as OpenAI's
    strict mode does: the calls stay valid against the original, and a model cannot wander
    off into invented keys."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else _closed(v))
           for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the JSON text, as OpenAI's `arguments`


def as_tagged(text: str) -> str:
    """A bare-JSON call (see `_lark`) written the tagged way; other text unchanged."""
    if text.lstrip().startswith("{"):
        return f"{CALL_OPEN}\n{text.strip()}\n{CALL_CLOSE}"
    return text


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """(text before the first call, the calls) of a reply generated under the grammar."""
    head, sep, rest = as_tagged(text).partition(CALL_OPEN)
    if not sep:
        return text, []
    calls: list[ParsedCall] = []
    for block in (CALL_OPEN + rest).split(CALL_OPEN)[1:]:
        body = block.split(CALL_CLOSE, 1)[0].strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue  # cut off by max_tokens: not a call
        call = ParsedCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False))
        if call not in calls:
            calls.append(call)
    return head, calls


# An RFC 3339 full-date that exists: years 0001-9999, each month's own days, 29 February
# in leap years only. The grammar engine's own `date` format lets through 29 February of
# any year (hypothesis found "5922-02-29"), which the schema's format check rejects.
_YEAR = "([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DAYS = ("((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         "|02-(0[1-9]|1[0-9]|2[0-8]))")
DATE_PATTERN = f"^({_YEAR}-{_DAYS}|{_LEAP}-02-29)$"


def exact_dates(schema: Any) -> Any:
    """`schema` with every `"format": "date"` string (that has no pattern of its own) held
    to DATE_PATTERN instead, so the decoder can only write dates that exist."""
    if isinstance(schema, list):
        return [exact_dates(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: exact_dates(v) for k, v in schema.items()}
    if out.get("format") == "date" and "pattern" not in out:
        del out["format"]
        out["pattern"] = DATE_PATTERN
    return out


class ToolCallGrammar:
    """The grammar for one request's tools and tool_choice; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, tools: Sequence[dict[str, Any]], *,
                 choice: str = "auto", parallel: bool = True):
        if not tools:
            raise InvalidRequestError("tool_choice needs tools", param="tools")
        names = [tool_name(t) for t in tools]
        if choice not in ("auto", "required", "none") and choice not in names:
            raise InvalidRequestError(
                f"tool_choice names '{choice}', which is not among the tools offered "
                f"({', '.join(names)}).", param="tool_choice", code="invalid_value")
        self.tokenizer = tokenizer
        self.ll = ll_tokenizer(tokenizer)
        offered = [t for t in tools if choice in ("auto", "required") or tool_name(t) == choice]
        self.lark = self._lark(offered, choice == "auto", parallel) if choice != "none" \
            else f"start: TEXT\n{_TEXT}\n"
        problem = llg.LLMatcher.validate_grammar(
            llg.LLMatcher.grammar_from_lark(self.lark), self.ll)
        if problem and not problem.startswith("WARNING"):
            raise InvalidRequestError(f"a tool's parameters schema is not usable: {problem}",
                                      param="tools", code="invalid_value")

    def _marker(self, text: str) -> str:
        """A lark item for `text`: the special token when the vocabulary has one."""
        token = self.tokenizer.token_to_id(text)
        if token is not None and self.tokenizer.vocab.types[token] == USER_DEFINED:
            return f"<[{token}]>"
        return json.dumps(text)

    def _lark(self, tools: Sequence[dict[str, Any]], allow_text: bool, parallel: bool) -> str:
        rules = [f'call_open: {self._marker(CALL_OPEN)}',
                 f'call_close: {self._marker(CALL_CLOSE)}']
        alternatives = []
        for i, tool in enumerate(tools):
            schema = {**exact_dates(tool_parameters(tool)), "x-guidance": _JSON_STYLE}
            head = json.dumps(f'\n{{"name": {json.dumps(tool_name(tool))}, "arguments": ')
            rules.append(f'call_{i}: call_open {head} args_{i} "}}\\n" call_close')
            rules.append(f"args_{i}: %json {json.dumps(schema)}")
            alternatives.append(f"call_{i}")
        rules.append(f"call: {' | '.join(alternatives)}")
        rules.append('calls: call ("\\n" call)*' if parallel else "calls: call")
        if not allow_text:
            return "\n".join(["start: calls", *rules]) + "\n"
        # Under `auto` a model may also call with a bare {"name": ..., "arguments": ...}
        # object, which is how Qwen2.5 starts when it means to call (it almost never opens
        # with <tool_call> unprompted). Text may start with neither "<" nor "{", so the
        # branches part at the first byte.
        for i, tool in enumerate(tools):
            head = json.dumps(f'{{"name": {json.dumps(tool_name(tool))}, "arguments": ')
            rules.append(f'bare_{i}: {head} args_{i} "}}"')
        rules.append(f"bare: {' | '.join(f'bare_{i}' for i in range(len(tools)))}")
        start = f"start: calls | bare | TEXT\n{_TEXT}"
        return "\n".join([start, *rules]) + "\n"

    def matcher(self) -> llg.LLMatcher:
        matcher = llg.LLMatcher(self.ll, llg.LLMatcher.grammar_from_lark(self.lark),
                                log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"tool grammar: {matcher.get_error()}", param="tools")
        return matcher

    def mask_fn(self) -> MaskFn:
        """A fresh, stateful mask hook for one stream (it tracks the ids it has seen)."""
        return GrammarMask(self.matcher(), self.tokenizer)


class GrammarMask:
    """mask_fn(generated ids) -> allowed tokens, feeding the matcher the new ids first.

    Small models given `parallel` tend to repeat a call until max_tokens; a call that
    repeats an earlier one of the same reply therefore ends the reply (only end-of-turn
    tokens are allowed after it), and `parse_tool_calls` drops the repeat.
    """

    def __init__(self, matcher: llg.LLMatcher, tokenizer: Tokenizer):
        self.matcher = matcher
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seen = 0
        self.text = b""
        self.repeated = False

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:
        for token in generated[self.seen:]:
            if not self.matcher.consume_token(token):
                raise InvalidRequestError(f"tool grammar rejected a token: "
                                          f"{self.matcher.get_error()}")
            self.text += self.tokenizer.token_bytes(token)
        self.seen = len(generated)
        if self.repeated or self._ends_with_repeat():
            self.repeated = True
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[sorted(self.tokenizer.eog_ids)] = True
            return mask
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[:self.vocab_size]  # [vocab]
        return torch.from_numpy(bits.astype(np.bool_))

    def _ends_with_repeat(self) -> bool:
        close = CALL_CLOSE.encode()
        if not self.text.endswith(close):
            return False
        calls = [c.split(close, 1)[0].strip() for c in self.text.split(CALL_OPEN.encode())[1:]]
        return len(calls) > 1 and calls[-1] in calls[:-1]


def describe_tools(tools: Sequence[dict[str, Any]]) -> str:
    """The system text that tells a model without a tools template what it may call."""
    lines = ["You may call these functions. To call one, reply with exactly:",
             f'{CALL_OPEN}\n{{"name": <function name>, "arguments": <JSON object>}}\n'
             f"{CALL_CLOSE}", "Functions:"]
    for tool in tools:
        fn = tool["function"]
        lines.append(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                 "parameters": tool_parameters(tool)}, ensure_ascii=False))
    return "\n".join(lines)
