"""Cut text that arrives in pieces (an LLM's deltas) into clauses worth synthesising alone.

The trade-off is latency against prosody. Piper speaks a clause as one unit, so a cut in
the middle of a phrase sounds choppy and a clause of one word sounds clipped, yet waiting
for whole paragraphs delays the first audio. So: the first clause may be short (the user
is waiting for any sound), later clauses are longer, sentence ends always cut once a
clause has a few words, commas/semicolons/colons/dashes cut only once enough words have
gathered, and a clause that would be tiny waits to join the next one.

A cut needs to see the character after the punctuation: "3." may become "3.5", and "Dr."
is not a sentence end. A clause keeps the spaces after its cut, and the pieces returned
always concatenate back to the input exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Punctuation (plus closing quotes/brackets) followed by whitespace, or a line break.
_BREAK = re.compile(r"(?P<punct>[.!?…]+|[,;:—–])(?P<close>[\"'”’)\]]*)(?=\s)|(?P<newline>\n)")
_WORD = re.compile(r"\w")
_COMPLETE_TOKEN = re.compile(r"\S+(?=\s)")
_TOKEN_BEFORE = re.compile(r"(\S+)$")
_DOTTED_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")  # e.g. i.e. u.s. a.m.
_INITIAL = re.compile(r"^[A-Z]\.$")                 # "J. R. R. Tolkien"
_LIST_NUMBER = re.compile(r"^\d+\.$")

# Titles and short forms that end in a period without ending the sentence. ("etc." and
# "Inc." are left out: they usually do end the sentence they close.)
ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "no", "fig", "approx",
    "dept", "gen", "gov", "lt", "col", "sgt", "capt", "rev", "hon",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
))


@dataclass(frozen=True)
class ClausePolicy:
    """How many words a clause needs before each kind of break may cut it."""

    first_sentence_words: int = 2   # "Sure thing." may go alone: the user hears something
    first_soft_words: int = 4       # "Well, let me see," is a fine opener
    sentence_words: int = 3         # later, "Yes." and "Thank you." join the next sentence
    soft_words: int = 8             # later commas cut only long clauses
    max_words: int = 40             # a run-on without punctuation is cut at a space


DEFAULT_POLICY = ClausePolicy()


def count_words(text: str) -> int:
    """Whitespace-separated tokens holding a letter or digit ("..." is not a word)."""
    return sum(1 for token in text.split() if _WORD.search(token))


class ClauseSplitter:
    """Feed text deltas in; take clauses out as soon as they may be cut; flush at the end."""

    def __init__(self, policy: ClausePolicy = DEFAULT_POLICY):
        self.policy = policy
        self._pending = ""
        self._emitted = 0

    def feed(self, delta: str) -> list[str]:
        """Add a delta; return the clauses it completes (often none)."""
        self._pending += delta
        clauses = []
        while (cut := self._next_cut()) is not None:
            clauses.append(self._pending[:cut])
            self._pending = self._pending[cut:]
            self._emitted += 1
        return clauses

    def flush(self) -> str | None:
        """The rest of the text, once no more will come (None if nothing is left)."""
        rest, self._pending = self._pending, ""
        if not rest:
            return None
        self._emitted += 1
        return rest

    def _next_cut(self) -> int | None:
        first = self._emitted == 0
        p = self.policy
        sentence_min = p.first_sentence_words if first else p.sentence_words
        soft_min = p.first_soft_words if first else p.soft_words
        text = self._pending
        run_on = self._run_on_end(text)
        for match in _BREAK.finditer(text):
            if run_on is not None and match.end() > run_on:
                break
            hard = match["newline"] is not None or match["punct"][0] in ".!?…"
            if hard and match["newline"] is None and not self._ends_sentence(text, match):
                continue
            if count_words(text[: match.end()]) >= (sentence_min if hard else soft_min):
                return _skip_space(text, match.end())
        return None if run_on is None else _skip_space(text, run_on)

    @staticmethod
    def _ends_sentence(text: str, match: re.Match[str]) -> bool:
        """False for the period of "Dr.", "e.g.", "U.S.", "J." or a list's "2."."""
        if match["punct"] != ".":
            return True
        token_match = _TOKEN_BEFORE.search(text, 0, match.start("punct") + 1)
        if token_match is None:
            return True
        token = token_match.group(1).lstrip("\"'“‘([")
        lowered = token.lower()
        if lowered[:-1] in ABBREVIATIONS or _DOTTED_ACRONYM.match(lowered):
            return False
        if _INITIAL.match(token):
            return False
        line_start = token_match.start() == 0 or text[token_match.start() - 1] == "\n"
        return not (_LIST_NUMBER.match(token) and line_start)

    def _run_on_end(self, text: str) -> int | None:
        """Where a clause of `max_words` complete words ends, if the text has that many.

        A run-on without punctuation is cut there; punctuation after it waits its turn.
        """
        count = 0
        for token in _COMPLETE_TOKEN.finditer(text):
            count += bool(_WORD.search(token.group()))
            if count == self.policy.max_words:
                return token.end()
        return None


def _skip_space(text: str, cut: int) -> int:
    """Move a cut past the spaces after it, so a clause ends with them, not the next."""
    while cut < len(text) and text[cut].isspace():
        cut += 1
    return cut


def split_clauses(
    text: str | Iterable[str], policy: ClausePolicy = DEFAULT_POLICY
) -> Iterator[str]:
    """All clauses of a whole text (or of an iterable of deltas), the remainder last."""
    splitter = ClauseSplitter(policy)
    for delta in [text] if isinstance(text, str) else text:
        yield from splitter.feed(delta)
    if (rest := splitter.flush()) is not None:
        yield rest
