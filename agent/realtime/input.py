"""A session's input audio: wire bytes → 16 kHz samples → VAD turn events and the turn's ASR.

    append(bytes) ─► decoder (pcm16 24 kHz | G.711 8 kHz | Opus packets) ─► 16 kHz float32
                  ─► input buffer (what commit turns into a user item)
                  ─► VadStream ─► SpeechStarted / SpeechPaused / SpeechStopped
                  ─► ASRStream of the current turn (partials, speculative final)

Sample positions count from the start of the session's audio, as the VAD counts them, so
`audio_start_ms` / `audio_end_ms` in events are times in the stream the client sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from agent.audio import OpusPacketDecoder, RawStreamDecoder
from agent.audio.vad import (
    FRAME,
    SpeechStarted,
    SpeechStopped,
    VadEvent,
    VadOptions,
    VadStream,
)
from agent.errors import AudioError
from agent.realtime.protocol import RealtimeError
from agent.realtime.session_config import AudioFormat, TurnDetection
from agent.speech.asr_stream import ASRStream

RATE = 16_000
KEEP_BEFORE_SPEECH = 2 * RATE  # more than any prefix_padding_ms a client sets in practice


class InputAudio:
    def __init__(self, fmt: AudioFormat, turn: TurnDetection | None, vad_model: Any,
                 asr: Any, *, max_buffer_s: float, language: str | None = None):
        self.asr_engine = asr
        self.vad_model = vad_model
        self.language = language
        self.max_samples = int(max_buffer_s * RATE)
        self.position = 0            # samples decoded since the session began
        self.buffer_start = 0        # where the uncommitted input begins
        self._chunks: list[np.ndarray] = []
        self.turn: ASRStream | None = None
        self.speaking_since: int | None = None  # onset sample of the speech in progress
        self.set_format(fmt)
        self.set_turn_detection(turn)

    def set_format(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._decoder: Any = OpusPacketDecoder(RATE) if fmt.kind == "opus" else \
            RawStreamDecoder(fmt.codec, input_rate=fmt.rate, rate=RATE)

    def set_turn_detection(self, turn: TurnDetection | None) -> None:
        self.turn_detection = turn
        self.vad = None if turn is None else VadStream(self.vad_model, VadOptions(
            threshold=turn.threshold, prefix_padding_ms=turn.prefix_padding_ms,
            silence_duration_ms=turn.silence_duration_ms))
        if self.vad is not None:
            self.vad.position = self.position  # its offsets continue the session's

    @property
    def voiced_until(self) -> int | None:
        """The end of the last voiced frame of the speech in progress (None when nobody
        speaks): how long someone has spoken, not counting the pause after it."""
        if self.speaking_since is None or self.vad is None:
            return None
        threshold = self.vad.options.voiced_threshold
        for at, probability in reversed(self.vad.history):
            if at < self.speaking_since:
                break
            if probability >= threshold:
                return at + FRAME
        return self.speaking_since

    @property
    def buffered_ms(self) -> int:
        return (self.position - self.buffer_start) * 1000 // RATE

    def decode(self, data: bytes, event_id: str | None) -> np.ndarray:
        try:
            return self._decoder.decode(data)
        except AudioError as exc:
            raise RealtimeError(f"the audio could not be decoded as {self.format.kind}: "
                                f"{exc}", code="invalid_audio", param="audio",
                                event_id=event_id) from exc

    async def append(self, data: bytes, event_id: str | None = None) -> list[VadEvent]:
        """Take one append's audio; returns the VAD's events for it (none without VAD)."""
        samples = self.decode(data, event_id)
        if self.position + len(samples) - self.buffer_start > self.max_samples:
            raise RealtimeError(
                f"the input audio buffer holds more than {self.max_samples // RATE} s; "
                "commit or clear it", code="input_audio_buffer_full", event_id=event_id)
        self._chunks.append(samples)
        self.position += len(samples)
        if self.turn is not None:
            self.turn.feed(samples)
        if self.vad is None or not len(samples):
            return []
        events = await self.vad.feed_async(samples)
        for event in events:
            if isinstance(event, SpeechStarted):
                self._start_turn(event)
            elif isinstance(event, SpeechStopped):
                self.speaking_since = None
        if not self.vad.speaking and self.turn is None:
            self._forget_silence()
        return events

    def _forget_silence(self) -> None:
        """Between turns only the last moments matter (a turn's prefix padding reaches
        back into them): older silence is dropped so a quiet session never fills up."""
        keep_from = self.position - KEEP_BEFORE_SPEECH
        if keep_from > self.buffer_start:
            rest = self.samples(keep_from, self.position)
            self._chunks, self.buffer_start = [rest], keep_from

    def _start_turn(self, event: SpeechStarted) -> None:
        self.speaking_since = event.onset
        self.turn = ASRStream(self.asr_engine, start_sample=event.sample,
                              language=self.language)
        self.turn.feed(self.samples(event.sample, self.position))

    def samples(self, start: int, end: int) -> np.ndarray:
        """Decoded input between two session positions (within the uncommitted buffer)."""
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        self._chunks = [audio]
        lo, hi = max(start - self.buffer_start, 0), max(end - self.buffer_start, 0)
        return audio[lo:hi]

    def take(self, end: int | None = None) -> tuple[np.ndarray, int, int]:
        """Commit: (audio, start, end) of the buffer up to `end`; the rest stays buffered."""
        end = self.position if end is None else min(end, self.position)
        start = self.buffer_start
        audio = self.samples(start, end)
        rest = self.samples(end, self.position)
        self._chunks, self.buffer_start = [rest], end
        return audio, start, end

    def clear(self) -> None:
        self._chunks, self.buffer_start = [], self.position
        self.speaking_since = None

    def detach_turn(self) -> ASRStream | None:
        turn, self.turn = self.turn, None
        return turn

    async def aclose(self) -> None:
        if self.turn is not None:
            await asyncio.shield(self.turn.aclose())
            self.turn = None
