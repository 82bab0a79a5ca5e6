"""Streaming transcription of one user turn: partials while it is spoken, a fast final.

The realtime session feeds every input chunk and relays two VAD moments:

- `speculate(speech_end)` when silence begins (VAD `SpeechPaused`): the final pass starts
  at once on the audio up to `speech_end`, while the VAD is still waiting out
  `silence_duration_ms`;
- `finish(speech_end)` when the turn ends (VAD `SpeechStopped`): if the speculation was
  for the same `speech_end` (no speech came back in between) its result is the final,
  usually already computed; otherwise a final pass runs now.

Both passes transcribe exactly `[turn start, speech_end + TAIL)`, so a reused speculation
is the transcript `finish` would have computed itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from agent.audio.vad import as_samples
from agent.speech.transcript import Transcript
from agent.speech.workers import Priority


class Transcriber(Protocol):
    """What turn transcription needs of the ASR (ASREngine; a fake in tests)."""

    def resolve_language(self, language: str | None) -> str | None: ...

    async def transcribe_async(self, audio: np.ndarray, *, language: str | None = None,
                               words: bool = True, priority: Priority = Priority.BATCH,
                               ) -> Transcript: ...

    async def transcribe_partial_async(self, audio: np.ndarray, *,
                                       language: str | None = None) -> Transcript | None: ...

RATE = 16_000
# Audio kept after the last voiced frame: one VAD frame, which has always arrived by the
# time the VAD reports the pause, so speculating never waits for audio.
TAIL = 512
# Seconds of new audio between partial passes. A partial still running when the user
# stops delays the end-of-turn pass (a pass cannot be interrupted), so partials are
# spaced out: at 1 s and ~0.25 s per pass, a quarter of turns wait, on average ~0.12 s.
PARTIAL_INTERVAL = 1.0
MIN_PARTIAL_SAMPLES = RATE // 2
MAX_PARTIAL_SAMPLES = 25 * RATE   # beyond the short window a partial would cost a full pass


class _Buffer:
    """Growable float32 sample buffer (amortised O(1) appends)."""

    def __init__(self) -> None:
        self._data = np.zeros(RATE * 4, dtype=np.float32)
        self.size = 0

    def append(self, chunk: np.ndarray) -> None:
        needed = self.size + len(chunk)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), dtype=np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:needed] = chunk
        self.size = needed

    def view(self, end: int) -> np.ndarray:
        return self._data[: min(end, self.size)].copy()


class ASRStream:
    """Transcribes one turn as it arrives. Use from one event loop task.

    Sample offsets (`start_sample`, `speech_end`) are positions in the session's 16 kHz
    input, as `VadStream` reports them; transcript times are seconds from `start_sample`.
    Feed each chunk here before acting on the VAD events of that chunk.
    """

    def __init__(self, engine: Transcriber, *, start_sample: int = 0,
                 language: str | None = None, partial_interval: float | None = PARTIAL_INTERVAL,
                 words: bool = False) -> None:
        self.engine = engine
        self.start_sample = start_sample
        self.language = language
        # Word timings cost an alignment pass on the end-of-turn path; the realtime
        # protocol's input transcription carries none, so they are off by default.
        self.words = words
        engine.resolve_language(language)
        self._interval = None if partial_interval is None else int(partial_interval * RATE)
        self._audio = _Buffer()
        self._partials: asyncio.Queue[Transcript | None] = asyncio.Queue()
        self._partial_task: asyncio.Task | None = None
        self._covered = 0          # samples the latest partial or speculation looked at
        self._speculation: tuple[int, asyncio.Task[tuple[Transcript, float]]] | None = None
        self._finished = False
        self.latest_partial: Transcript | None = None
        # perf_counter() when the transcript `finish` returned was computed.
        self.final_ready_at: float | None = None

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self._audio.size

    def feed(self, chunk: np.ndarray) -> None:
        """Append 16 kHz audio; may start a partial pass in the background."""
        if self._finished:
            return
        self._audio.append(as_samples(chunk))
        if self._partial_due():
            self._partial_task = asyncio.get_running_loop().create_task(
                self._run_partial(self._audio.size)
            )

    def _partial_due(self) -> bool:
        if self._interval is None or self._finished:
            return False
        if self._partial_task is not None and not self._partial_task.done():
            return False  # never pile up: skip while the previous partial runs
        if self._speculation is not None and not self._speculation[1].done():
            return False
        size = self._audio.size
        return (MIN_PARTIAL_SAMPLES <= size <= MAX_PARTIAL_SAMPLES
                and size - self._covered >= self._interval)

    async def _run_partial(self, end: int) -> None:
        self._covered = end
        transcript = await self.engine.transcribe_partial_async(
            self._audio.view(end), language=self.language
        )
        if transcript is not None and not self._finished:
            self.latest_partial = transcript
            self._partials.put_nowait(transcript)

    async def partials(self) -> AsyncIterator[Transcript]:
        """Partial transcripts as they come; ends when the turn is finished."""
        while True:
            item = await self._partials.get()
            if item is None:
                return
            yield item

    def _span_end(self, speech_end: int | None) -> int:
        if speech_end is None:
            return self._audio.size
        return max(speech_end - self.start_sample + TAIL, 0)

    def speculate(self, speech_end: int) -> None:
        """Silence began after `speech_end`: start the final pass now, in case it stays."""
        if self._finished or (self._speculation and self._speculation[0] == speech_end):
            return
        if self._speculation is not None:
            self._speculation[1].cancel()  # speech resumed since that pause
        if self._partial_task is not None:
            # The turn may be ending: a partial still queued would only delay the
            # final pass of another session; one already running cannot be stopped.
            self._partial_task.cancel()
        end = self._span_end(speech_end)
        self._covered = end
        task = asyncio.get_running_loop().create_task(self._run_final(end))
        self._speculation = (speech_end, task)

    async def _run_final(self, end: int) -> tuple[Transcript, float]:
        transcript = await self.engine.transcribe_async(
            self._audio.view(end), language=self.language, words=self.words,
            priority=Priority.FINAL,
        )
        return transcript, time.perf_counter()

    async def speculative(self, speech_end: int) -> Transcript | None:
        """The transcript of the final pass `speculate(speech_end)` started, once it is
        done; None when there is no such pass or speech resumed and cancelled it."""
        if self._speculation is None or self._speculation[0] != speech_end:
            return None
        task = self._speculation[1]
        await asyncio.wait([task])  # not `await task`: cancelling us must not cancel it
        if task.cancelled() or task.exception() is not None:
            return None
        return task.result()[0]

    async def finish(self, speech_end: int | None = None) -> Transcript:
        """The final transcript of the turn, up to `speech_end` (None: all audio fed)."""
        self._finished = True
        self._partials.put_nowait(None)
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speech_end is not None and speculation[0] == speech_end:
            transcript, self.final_ready_at = await speculation[1]
            return transcript
        if speculation is not None:
            speculation[1].cancel()  # speech resumed after that pause: its text is stale
        transcript, self.final_ready_at = await self._run_final(self._span_end(speech_end))
        return transcript

    async def aclose(self) -> None:
        """Abandon the turn (barge-in, disconnect): cancel pending passes."""
        self._finished = True
        self._partials.put_nowait(None)
        tasks = [t for t in (self._partial_task,
                             self._speculation[1] if self._speculation else None) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
