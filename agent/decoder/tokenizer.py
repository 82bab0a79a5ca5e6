"""The model's tokenizer and chat template: byte-level BPE via `tokenizers`, Jinja via jinja2.

A GGUF's metadata gives the vocabulary; a checkpoint folder's tokenizer.json gives it as a
`Vocabulary` too (hf_loader.py), with its own normalizer and pre-tokenizer.

Ids must equal llama.cpp's (tests/fixtures/tokenizer_*.json), so the pieces mirror what
llama.cpp builds from the same metadata:

- the BPE model takes the vocabulary and merges as stored in the GGUF;
- the pre-tokenizer regex is chosen by `tokenizer.ggml.pre` (llama.cpp's table);
- CONTROL tokens (`<|im_start|>`, ...) are matched in text only when `special=True`;
  USER_DEFINED tokens (Qwen's `<tool_call>`) are always matched, as llama.cpp does.

Text comes back through `token_bytes`: every id maps to its raw bytes once, and
`StreamDecoder` turns a growing id sequence into text deltas that never split a UTF-8
character.
"""

from __future__ import annotations

import codecs
import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from agent.errors import ConfigError, InvalidRequestError

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> regexes applied in turn (as llama.cpp's llm_tokenizer_bpe does).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
}

# Control tokens that end a turn even when the file names another EOS (llama.cpp does this).
_END_OF_TURN_TEXTS = frozenset({"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                                "<|end|>", "<end_of_turn>", "<|end_of_text|>"})


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode map used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ConfigError(f"unsupported tokenizer pre-type {pre!r}; known: {known}")
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False)
              for rx in PRE_TOKENIZERS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False)])


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Hugging Face's templates expect plain json.dumps, not jinja's HTML-escaping tojson.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}", param="messages")


def _text_content(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise InvalidRequestError("message content must be a string or a list of parts",
                              param="messages")


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None
    extra_eog: tuple[int, ...] = ()
    # A Hugging Face tokenizer.json's own pieces (hf_loader.py); a GGUF names its
    # pre-tokenizer by `pre` and has no normalizer.
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None
    normalizer: normalizers.Normalizer | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Vocabulary:
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ConfigError(f"unsupported tokenizer model {model!r} (byte-level BPE only)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
        eog = tuple(int(meta[k]) for k in ("tokenizer.ggml.eot_token_id",
                                            "tokenizer.ggml.eom_token_id") if k in meta)
        return cls(tokens=tokens, types=types, merges=list(meta["tokenizer.ggml.merges"]),
                   pre=str(meta.get("tokenizer.ggml.pre", "default")),
                   bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), extra_eog=eog)


class Tokenizer:
    """Encode/decode with llama.cpp's ids, and render the model's chat template."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.vocab_size = len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self._plain, self._special = self._build(vocab)
        self._bytes = self._token_bytes(vocab)
        self._template = self._compile(vocab.chat_template) if vocab.chat_template else None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        return cls(Vocabulary.from_metadata(meta))

    @staticmethod
    def _build(vocab: Vocabulary) -> tuple[HFTokenizer, HFTokenizer]:
        ids = {tok: i for i, tok in enumerate(vocab.tokens)}
        merges = [(a, b) for a, _, b in (m.partition(" ") for m in vocab.merges)]
        base = HFTokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False,
                                      byte_fallback=False))
        base.pre_tokenizer = vocab.pre_tokenizer or _pre_tokenizer(vocab.pre)
        if vocab.normalizer is not None:
            base.normalizer = vocab.normalizer
        base.decoder = decoders.ByteLevel()
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(vocab.tokens, vocab.types, strict=True) if ty == CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(vocab.tokens, vocab.types, strict=True) if ty == USER_DEFINED]
        base.add_tokens(user)
        special = HFTokenizer.from_str(base.to_str())
        special.add_special_tokens(control)
        return base, special

    @staticmethod
    def _token_bytes(vocab: Vocabulary) -> list[bytes]:
        table = _byte_decoder()
        out = []
        for tok, ty in zip(vocab.tokens, vocab.types, strict=True):
            if ty == CONTROL:
                out.append(b"")  # never shown as text (llama.cpp's special=False piece)
            elif ty == USER_DEFINED:
                out.append(tok.encode())
            else:
                out.append(b"".join(bytes([table[c]]) if c in table else c.encode() for c in tok))
        return out

    # --- ids -------------------------------------------------------------------------

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS). `special=True` turns `<|im_start|>` etc. into
        their control tokens; otherwise they are tokenised as plain text."""
        tok = self._special if special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; empty for control tokens and ids past the vocabulary
        (a model's output layer may be padded beyond it)."""
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens are dropped, broken UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    @cached_property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, EOT, and the usual end-of-turn control tokens."""
        ids = {i for i in (self.eos_id, *self.vocab.extra_eog) if i is not None}
        ids.update(i for i, (t, ty) in enumerate(zip(self.vocab.tokens, self.vocab.types,
                                                     strict=True))
                   if ty == CONTROL and t in _END_OF_TURN_TEXTS)
        return frozenset(ids)

    def token_to_id(self, text: str) -> int | None:
        return self._special.token_to_id(text)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers` object (special tokens enabled), e.g. for llguidance."""
        return self._special

    # --- chat ------------------------------------------------------------------------

    @staticmethod
    def _compile(source: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template does not parse: {exc}") from exc

    def with_chat_template(self, source: str) -> Tokenizer:
        """A tokenizer sharing this vocabulary but rendering chats with `source`."""
        clone = copy.copy(self)
        clone._template = self._compile(source)
        return clone

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: Sequence[dict[str, Any]], *,
                    tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (OpenAI-style dicts), via the GGUF's template."""
        if self._template is None:
            raise ConfigError("this model has no chat template; use a raw prompt")
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequestError("each message needs a role", param="messages")
            clean.append({**m, "content": _text_content(m.get("content"))})
        tokens = self.vocab.tokens
        try:
            return self._template.render(
                messages=clean, tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=tokens[self.bos_id] if self.bos_id is not None else "",
                eos_token=tokens[self.eos_id] if self.eos_id is not None else "")
        except InvalidRequestError:
            raise
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidRequestError(f"cannot format messages: {exc}",
                                      param="messages") from exc

    def encode_chat(self, messages: Sequence[dict[str, Any]], *,
                    tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        ids = self.encode(text, special=True)
        if self.vocab.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids


class StreamDecoder:
    """Token ids in, text deltas out; a multi-byte character is held until complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is pending at the end (a truncated character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
