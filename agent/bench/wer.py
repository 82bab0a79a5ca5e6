"""Word error counts for the benchmarks that check what the ASR heard.

Both sides are normalised the same way first: lower case, punctuation dropped, and the
small numbers Whisper writes as digits ("2 at 7") spelled out, so that a transcript is
not charged for writing a number the other way.
"""

from __future__ import annotations

import re

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen", "twenty"]
_SPELLED = {str(value): word for value, word in enumerate(_NUMBERS)}


def normalised_words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9']+", text.lower().replace("’", "'"))
    return [_SPELLED.get(word, word) for word in words]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference): the edit
    distance over normalised words."""
    ref, hyp = normalised_words(reference), normalised_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, expected in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, heard in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                           diagonal + (expected != heard))
    return row[len(hyp)], len(ref)
