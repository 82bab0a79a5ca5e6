"""Voice activity detection: Silero VAD (ONNX) on 16 kHz audio, one state per stream.

The model scores frames of 512 samples (32 ms). Since v5 it also wants the last 64 samples
of the previous frame in front of each frame, plus a recurrent state of shape (2, 1, 128);
both belong to the stream, so one `SileroVad` (one ONNX session; `run` is thread-safe)
serves any number of `VadStream`s.

`VadStream` turns frame probabilities into turns with OpenAI's `server_vad` meanings:
`threshold` is the probability that counts as speech; `speech_started` reports the onset
minus `prefix_padding_ms`; `speech_stopped` comes after `silence_duration_ms` of silence
and reports the end of that silence (the end of the audio the turn sends to the model).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.config import Settings
from agent.errors import AudioError, InvalidRequestError

RATE = 16_000
FRAME = 512          # samples the model scores at a time (32 ms)
CONTEXT = 64         # samples of the previous frame prepended to each frame
STATE_SHAPE = (2, 1, 128)
# Below threshold - HYSTERESIS (or half the threshold, if higher) a frame counts as silence;
# in between, speech keeps going. Silero's own segmenter uses the same 0.15 gap; it stops a
# turn flickering on soft syllables.
HYSTERESIS = 0.15
HISTORY_FRAMES = 10 * RATE // FRAME  # ~10 s of per-frame probabilities kept per stream


class FrameScorer(Protocol):
    """What a `VadStream` needs of its model (SileroVad; a fake in tests)."""

    def score(self, frame: np.ndarray, context: np.ndarray, state: np.ndarray
              ) -> tuple[float, np.ndarray]: ...


class SileroVad:
    """The Silero VAD model behind one ONNX session, shared by every stream."""

    def __init__(self, model_path: str | Path, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._rate = np.array(RATE, dtype=np.int64)

    @classmethod
    def from_settings(cls, settings: Settings) -> SileroVad:
        from agent import assets

        return cls(assets.resolve("silero-vad", settings.cache_dir))

    def score(self, frame: np.ndarray, context: np.ndarray, state: np.ndarray
              ) -> tuple[float, np.ndarray]:
        """Speech probability of one 512-sample frame; returns it with the next state."""
        window = np.concatenate([context, frame])[None, :]  # (1, CONTEXT + FRAME)
        probability, next_state = self._session.run(
            None, {"input": window, "state": state, "sr": self._rate}
        )
        return float(probability[0, 0]), next_state

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Per-frame speech probabilities of a whole 16 kHz clip (a fresh state)."""
        audio = as_samples(audio)
        state = np.zeros(STATE_SHAPE, dtype=np.float32)
        context = np.zeros(CONTEXT, dtype=np.float32)
        out = np.empty(len(audio) // FRAME, dtype=np.float32)
        for i in range(len(out)):
            frame = audio[i * FRAME:(i + 1) * FRAME]
            out[i], state = self.score(frame, context, state)
            context = frame[-CONTEXT:]
        return out


def as_samples(chunk: np.ndarray) -> np.ndarray:
    """16 kHz mono audio as float32 in [-1, 1]; int16 PCM is scaled. Rejects arrays that
    are not mono samples (the speech engines share this check)."""
    array = np.asarray(chunk)
    if array.ndim != 1:
        raise AudioError(f"expected mono audio as a 1-D array, got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"expected float32 or int16 samples, got {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise AudioError("audio contains NaN or infinite samples")
    return array


@dataclass(frozen=True)
class SpeechStarted:
    """Speech began. `sample` is where the turn's audio starts (onset minus prefix padding,
    never before the previous turn's end); `onset` is the first voiced frame."""

    sample: int
    onset: int

    @property
    def audio_start_ms(self) -> int:
        return self.sample * 1000 // RATE


@dataclass(frozen=True)
class SpeechPaused:
    """Silence began inside speech (a candidate end of turn). `speech_end` is the end of the
    last voiced frame; nothing is decided yet: speech may resume."""

    speech_end: int


@dataclass(frozen=True)
class SpeechStopped:
    """The turn ended: `silence_duration_ms` of silence followed `speech_end`. `sample` is
    the end of that silence, the end of the turn's audio (OpenAI's audio_end_ms)."""

    sample: int
    speech_end: int

    @property
    def audio_end_ms(self) -> int:
        return self.sample * 1000 // RATE


VadEvent = SpeechStarted | SpeechPaused | SpeechStopped


@dataclass(frozen=True)
class VadOptions:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    # Voiced audio needed before speech counts as started: rejects clicks and short blips.
    min_speech_ms: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidRequestError(
                f"threshold must be between 0 and 1, got {self.threshold}", param="threshold"
            )
        for name in ("prefix_padding_ms", "silence_duration_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must not be negative", param=name)

    @property
    def voiced_threshold(self) -> float:
        """The probability from which a frame is voiced. OpenAI accepts 0 and 1, which
        would mean "always" and "never" speech, so they are clamped."""
        return min(max(self.threshold, 0.05), 0.99)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> VadOptions:
        """The configured defaults, with a session's turn_detection values over them."""
        values: dict[str, object] = {
            "threshold": settings.vad_threshold,
            "prefix_padding_ms": settings.vad_prefix_padding_ms,
            "silence_duration_ms": settings.vad_silence_duration_ms,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _ms_to_samples(ms: int) -> int:
    return ms * RATE // 1000


class VadStream:
    """One audio stream's voice activity: feed chunks of any size, get turn events.

    Sample offsets count from the first sample ever fed (or from the last `reset`).
    Not thread-safe: one stream belongs to one session task.
    """

    def __init__(self, model: FrameScorer, options: VadOptions | None = None) -> None:
        self.model = model
        self.options = options or VadOptions()
        self.history: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=HISTORY_FRAMES
        )
        self.reset()

    def reset(self) -> None:
        """Forget all audio: model state, pending samples, turn state and offsets."""
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self.position = 0                 # samples scored so far
        self.speaking = False
        self.probability = 0.0            # of the latest frame
        self._onset: int | None = None    # first voiced frame of a candidate start
        self._voiced = 0                  # voiced samples since that onset
        self._silence_from: int | None = None  # end of the last voiced frame, in speech
        self._turn_floor = 0              # a new turn's audio never starts before this
        self.history.clear()

    def feed(self, chunk: np.ndarray) -> list[VadEvent]:
        """Score every complete frame in `chunk` (plus leftovers); return the events."""
        samples = np.concatenate([self._pending, as_samples(chunk)])
        whole = len(samples) // FRAME * FRAME
        self._pending = samples[whole:].copy()
        events: list[VadEvent] = []
        for start in range(0, whole, FRAME):
            frame = samples[start:start + FRAME]
            probability, self._state = self.model.score(frame, self._context, self._state)
            self._context = frame[-CONTEXT:]
            self.history.append((self.position, probability))
            self.probability = probability
            self._step(probability, events)
            self.position += FRAME
        return events

    async def feed_async(self, chunk: np.ndarray) -> list[VadEvent]:
        """`feed` in a worker thread (about 0.15 ms of model time per 32 ms frame)."""
        return await asyncio.to_thread(self.feed, chunk)

    def _step(self, probability: float, events: list[VadEvent]) -> None:
        frame_start, frame_end = self.position, self.position + FRAME
        threshold = self.options.voiced_threshold
        voiced = probability >= threshold
        silent = probability < max(threshold - HYSTERESIS, threshold / 2)
        if not self.speaking:
            self._await_start(voiced, silent, frame_start, events)
            return
        if silent:
            if self._silence_from is None:
                self._silence_from = frame_start
                events.append(SpeechPaused(frame_start))
            stop_at = self._silence_from + _ms_to_samples(self.options.silence_duration_ms)
            if frame_end >= stop_at:
                events.append(SpeechStopped(stop_at, self._silence_from))
                self.speaking = False
                self._turn_floor = stop_at
                self._silence_from = None
        elif voiced:
            self._silence_from = None  # the pause was not the end: speech resumed

    def _await_start(self, voiced: bool, silent: bool, frame_start: int,
                     events: list[VadEvent]) -> None:
        if voiced:
            if self._onset is None:
                self._onset, self._voiced = frame_start, 0
            self._voiced += FRAME
        elif silent:
            self._onset = None
        if self._onset is not None and self._voiced >= max(
            _ms_to_samples(self.options.min_speech_ms), 1
        ):
            begin = max(self._onset - _ms_to_samples(self.options.prefix_padding_ms),
                        self._turn_floor)
            events.append(SpeechStarted(begin, self._onset))
            self.speaking = True
            self._onset = None
            self._silence_from = None


def speech_segments(model: SileroVad, audio: np.ndarray, options: VadOptions | None = None
                    ) -> list[tuple[int, int]]:
    """Turns in a whole clip as (start, end) samples, as a live stream would report them;
    a turn still open at the end of the clip ends there."""
    stream = VadStream(model, options)
    segments: list[tuple[int, int]] = []
    start: int | None = None
    for event in stream.feed(audio):
        if isinstance(event, SpeechStarted):
            start = event.sample
        elif isinstance(event, SpeechStopped) and start is not None:
            segments.append((start, event.sample))
            start = None
    if start is not None:
        segments.append((start, len(as_samples(audio))))
    return segments
