"""Text to speech with Piper: whole texts, and text that streams in as an LLM writes it.

`TTSEngine.stream` takes text deltas, cuts them into clauses (`agent.speech.clauses`) and
yields one `AudioChunk` per clause, so the first audio exists long before the last word.
Each chunk carries the text it speaks, for transcript deltas beside the audio. Output is
float32 mono PCM at the voice's own rate (22,050 Hz for joe); encoders resample.

Synthesis runs in a thread pool, never on the event loop. Stopping the stream (closing the
generator, or cancelling the task that reads it) stops synthesis: no clause is started
after the consumer has gone, and a clause in flight is dropped.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from agent.audio.stretch import stretch
from agent.config import Settings
from agent.errors import InvalidRequestError
from agent.speech.clauses import DEFAULT_POLICY, ClausePolicy, ClauseSplitter, split_clauses
from agent.speech.voices import LoadedVoice, SpeedPlan, VoiceBank
from agent.speech.workers import PriorityPool

MIN_SPEED = 0.25
MAX_SPEED = 4.0
# Piper scales each clause to a full-scale peak; lossy encoders (mp3, aac, opus) overshoot
# such peaks and clip, so leave about 1 dB of headroom.
VOLUME = 0.89

_SPEAKABLE = re.compile(r"\w")
# Control characters (a NUL crashes espeak) and lone surrogates (not encodable).
_UNSPEAKABLE_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_MARKDOWN = (
    (re.compile(r"\[([^\]\n]+)\]\([^)\s]*\)"), r"\1"),              # [text](url) → text
    (re.compile(r"^[ \t]{0,3}(?:#{1,6}|[-*+]|>)[ \t]+", re.M), ""),  # headings, bullets, quotes
    (re.compile(r"\*+(?=\S)|(?<=\S)\*+|_{2,3}|`+"), ""),            # emphasis, code ticks
)

T = TypeVar("T")
# Synthesis order when sessions share the cores: a reply's first clause is what a caller
# is waiting to hear; a whole text is one request's answer; later clauses of a streamed
# reply are queued while its first ones play, so they can wait behind both.
FIRST_CLAUSE, WHOLE_TEXT, LATER_CLAUSE = 0, 1, 2


@dataclass(frozen=True)
class AudioChunk:
    """Speech for one clause: float32 mono samples at `rate`, and the text they speak.

    `pcm` is empty when the text holds nothing to say (only punctuation or spaces); the
    chunk still carries the text so that chunk texts always add up to the input.
    """

    pcm: np.ndarray
    rate: int
    text: str

    @property
    def duration(self) -> float:
        return len(self.pcm) / self.rate


def check_speed(speed: object) -> float:
    """The speed as a float in [0.25, 4.0], or InvalidRequestError(param="speed")."""
    valid = isinstance(speed, int | float) and not isinstance(speed, bool)
    if not (valid and isinstance(speed, int | float) and math.isfinite(speed)
            and MIN_SPEED <= speed <= MAX_SPEED):
        raise InvalidRequestError(
            f"speed must be a number from {MIN_SPEED} to {MAX_SPEED}, got {speed!r}",
            param="speed",
        )
    return float(speed)


def speakable(text: str) -> str:
    """Text as Piper should read it: markdown marks (**, `, #, bullets, link URLs) and
    control characters removed."""
    text = _UNSPEAKABLE_CHARS.sub(" ", text)
    for pattern, replacement in _MARKDOWN:
        text = pattern.sub(replacement, text)
    return text


class TTSEngine:
    """Piper synthesis for every configured voice. Safe to share between sessions."""

    def __init__(self, settings: Settings, voices: VoiceBank | None = None):
        self.voices = voices or VoiceBank(settings)
        self.default_voice = settings.default_voice
        self._varied = settings.tts_variation
        # onnxruntime uses `tts_threads` per run; this many runs fill the cores.
        workers = max(1, (os.cpu_count() or 2) // max(1, settings.tts_threads))
        self._pool = PriorityPool(workers, "tts")

    @property
    def voice_names(self) -> tuple[str, ...]:
        return self.voices.names

    def check(self, voice: str | None, speed: object = 1.0) -> tuple[str, float]:
        """Validate a request's voice and speed before any work starts."""
        name = self.default_voice if voice is None else voice
        return self.voices.check(name), check_speed(speed)

    def load(self, voice: str | None = None) -> int:
        """Load, measure and warm a voice now rather than on its first request (a server
        calls this at start-up); return its sample rate."""
        loaded = self.voices.get(self.default_voice if voice is None else voice)
        loaded.fixed_fraction  # noqa: B018 - the speed calibration doubles as a warm-up
        return loaded.rate

    def close(self) -> None:
        self._pool.shutdown()

    # --- whole texts ---

    def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> tuple[np.ndarray, int]:
        """Speak a whole text (blocking): (float32 mono PCM, sample rate)."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"the text to speak must be a string, not {text!r}")
        loaded, plan = self._prepare(*self.check(voice, speed))
        pieces = [_speak(loaded, clause, plan, self._varied)
                  for clause in split_clauses(text)]
        pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return pcm, loaded.rate

    async def synthesize_async(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> AudioChunk:
        """Speak a whole text off the event loop."""
        pcm, rate = await self._run(WHOLE_TEXT, self.synthesize, text, voice, speed)
        return AudioChunk(pcm, rate, text)

    # --- streaming ---

    async def stream(
        self,
        text: str | AsyncIterable[str] | Iterable[str],
        voice: str | None = None,
        speed: float = 1.0,
        *,
        policy: ClausePolicy = DEFAULT_POLICY,
    ) -> AsyncIterator[AudioChunk]:
        """Yield one AudioChunk per clause as soon as the text for it has arrived.

        Clauses are synthesised one at a time, each only when the consumer asks for the
        next chunk, so a consumer that stops (barge-in) costs no further synthesis.
        """
        name, speed = self.check(voice, speed)
        # Loading a voice, or measuring it for a new speed, is model work: off the loop.
        loaded, plan = await self._run(FIRST_CLAUSE, self._prepare, name, speed)
        splitter = ClauseSplitter(policy)
        source = text if isinstance(text, AsyncIterable) else _from_sync(text)
        priority = FIRST_CLAUSE
        async for delta in source:
            for clause in splitter.feed(delta):
                yield await self._clause(priority, loaded, clause, plan)
                priority = LATER_CLAUSE
        if (rest := splitter.flush()) is not None:
            yield await self._clause(priority, loaded, rest, plan)

    def _prepare(self, name: str, speed: float) -> tuple[LoadedVoice, SpeedPlan]:
        loaded = self.voices.get(name)
        return loaded, loaded.speed_plan(speed)

    async def _clause(self, priority: int, loaded: LoadedVoice, text: str, plan: SpeedPlan
                      ) -> AudioChunk:
        pcm = await self._run(priority, _speak, loaded, text, plan, self._varied)
        return AudioChunk(pcm, loaded.rate, text)

    async def _run(self, priority: int, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._pool.submit(priority, fn, *args))


def _speak(loaded: LoadedVoice, text: str, plan: SpeedPlan, varied: bool) -> np.ndarray:
    """One clause through Piper (blocking), stretched where the plan says. Piper may split
    it into sentences; join them. Unvaried speech zeroes the two noise inputs, the only
    random part of Piper's model."""
    from piper import SynthesisConfig

    spoken = speakable(text)
    if not _SPEAKABLE.search(spoken):
        return np.zeros(0, np.float32)
    config = SynthesisConfig(length_scale=plan.length_scale, volume=VOLUME)
    if not varied:
        config.noise_scale = config.noise_w_scale = 0.0
    pieces = [chunk.audio_float_array for chunk in loaded.piper.synthesize(spoken, config)]  # type: ignore[attr-defined]
    if not pieces:
        return np.zeros(0, np.float32)
    pcm = np.concatenate(pieces).astype(np.float32, copy=False)
    if plan.speed == 1.0:
        return pcm
    reference = SynthesisConfig(length_scale=loaded.length_scale(1.0), noise_w_scale=0.0)
    chunks = loaded.piper.synthesize(spoken, reference)  # type: ignore[attr-defined]
    at_one = int(np.sum([len(c.audio_float_array) for c in chunks]))
    tempo = len(pcm) * plan.speed / at_one if at_one else 1.0
    # Within 2% Piper already did it; a stretch would only cost a little quality.
    return stretch(pcm, loaded.rate, tempo) if abs(tempo - 1.0) > 0.02 else pcm


async def _from_sync(text: str | Iterable[str]) -> AsyncIterator[str]:
    for delta in [text] if isinstance(text, str) else text:
        yield delta
