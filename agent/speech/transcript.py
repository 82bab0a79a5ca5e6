"""What speech recognition returns: text, language, segments and word timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Word(NamedTuple):
    """One word with its times in seconds from the start of the audio."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float                      # seconds of audio transcribed
    segments: tuple[Segment, ...] = ()
    words: tuple[Word, ...] = ()         # empty unless word timings were asked for
    language_probability: float = 1.0    # below 1 only when the language was detected
    # How it was computed: "short" (Whisper window cut to the audio) or "full" (30 s window).
    window: str = field(default="short", compare=False)

    @classmethod
    def empty(cls, language: str, duration: float, window: str = "short") -> Transcript:
        return cls(text="", language=language, duration=duration, window=window)
