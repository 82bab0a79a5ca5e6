"""Speech recognition: faster-whisper (CTranslate2) behind a small priority worker pool.

`ASREngine` owns one Whisper model. Calls run on its own worker threads, never on the
event loop; end-of-turn transcripts jump ahead of queued partials, so a busy server
answers the user who just stopped talking first. Clips that fit use the short window
(`whisper_window`); longer clips, and short-window decodes the guard rejects, use
faster-whisper's own 30 s window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Literal

import numpy as np

from agent.audio.vad import as_samples as as_audio
from agent.config import Settings
from agent.errors import ConfigError, InvalidRequestError, ModelMissingError
from agent.speech.asr_stream import PARTIAL_INTERVAL, ASRStream
from agent.speech.transcript import Segment, Transcript, Word
from agent.speech.whisper_window import RATE, ShortWindow
from agent.speech.workers import Priority, PriorityPool

log = logging.getLogger(__name__)
Window = Literal["short", "full"]
# Less than one mel window of audio (25 ms) carries no speech.
MIN_SAMPLES = 400


def _pick_device(requested: str) -> str:
    if requested in ("cpu", "cuda"):
        return requested
    if requested != "auto":
        raise ConfigError(f"asr_device must be auto, cpu or cuda, not {requested!r}")
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def _model_path(settings: Settings) -> Path:
    from agent import assets

    name = settings.asr_model
    if name in assets.MODELS:
        return assets.resolve(name, settings.cache_dir)
    path = Path(name).expanduser()
    if not (path / "model.bin").is_file():
        raise ModelMissingError(f"ASR model folder {path} has no model.bin (CTranslate2 Whisper)")
    return path


class ASREngine:
    """One Whisper model shared by every request and stream of the process."""

    def __init__(self, settings: Settings, *, workers: int = 1) -> None:
        from faster_whisper import WhisperModel

        self.settings = settings
        self.device = _pick_device(settings.asr_device)
        compute_type = settings.asr_compute_type
        self.model = WhisperModel(
            str(_model_path(settings)), device=self.device, compute_type=compute_type,
            cpu_threads=settings.asr_threads, num_workers=workers,
        )
        self.languages = set(self.model.supported_languages)
        self.short_window = ShortWindow(self.model)
        self._pool = PriorityPool(workers, "asr")
        self._count_lock = threading.Lock()
        self.transcriptions = 0  # passes run, for tests and metrics
        self.fallbacks = 0       # short-window decodes the guard sent to the full window

    def close(self) -> None:
        self._pool.shutdown()

    def resolve_language(self, language: str | None) -> str | None:
        """A language code, or None to detect it ("auto")."""
        language = (language or self.settings.asr_language or "auto").lower()
        if language == "auto":
            return None
        if language not in self.languages:
            raise InvalidRequestError(f"unsupported language {language!r}", param="language")
        return language

    def transcribe(self, audio: np.ndarray, *, language: str | None = None,
                   words: bool = True, window: Window = "short",
                   prompt: str | None = None) -> Transcript:
        """Transcribe 16 kHz audio on the calling thread (CLI, benchmarks)."""
        audio = as_audio(audio)
        code = self.resolve_language(language)
        with self._count_lock:
            self.transcriptions += 1
        if len(audio) < MIN_SAMPLES:
            return Transcript.empty(code or "en", len(audio) / RATE, window)
        if window == "short":
            result = self.short_window.transcribe(audio, code, words, prompt)
            if isinstance(result, Transcript):
                return result
            if result != "longer than a short window":
                with self._count_lock:
                    self.fallbacks += 1
                log.info("short-window ASR fell back to the full window: %s", result)
        return self._transcribe_full(audio, code, words, prompt)

    async def transcribe_async(self, audio: np.ndarray, *, language: str | None = None,
                               words: bool = True, window: Window = "short",
                               priority: Priority = Priority.BATCH,
                               prompt: str | None = None) -> Transcript:
        """Transcribe on the ASR workers without blocking the event loop. `prompt` is text
        the audio continues (names, spellings), as Whisper's initial prompt."""
        audio = as_audio(audio)
        self.resolve_language(language)  # a bad code fails here, not on a worker
        future = self._pool.submit(priority, self._call, audio, language, words, window,
                                   prompt)
        return await asyncio.wrap_future(future)

    def _call(self, audio: np.ndarray, language: str | None, words: bool,
              window: Window, prompt: str | None) -> Transcript:
        return self.transcribe(audio, language=language, words=words, window=window,
                               prompt=prompt)

    async def transcribe_partial_async(self, audio: np.ndarray, *, language: str | None = None
                                       ) -> Transcript | None:
        """A cheap look at an unfinished turn: short window only, no word timings, behind
        any end-of-turn work. None when the guard rejects it: a partial is not worth a full
        30 s pass, and a wrong one is worse than none."""
        audio = as_audio(audio)
        code = self.resolve_language(language)
        future = self._pool.submit_skippable(Priority.PARTIAL, None, self._partial, audio,
                                             code)
        return await asyncio.wrap_future(future)

    def _partial(self, audio: np.ndarray, language: str | None) -> Transcript | None:
        with self._count_lock:
            self.transcriptions += 1
        result = self.short_window.transcribe(audio, language, words=False)
        return result if isinstance(result, Transcript) else None

    def _transcribe_full(self, audio: np.ndarray, language: str | None, words: bool,
                         prompt: str | None = None) -> Transcript:
        """Plain faster-whisper: 30 s windows, greedy, its temperature fallback."""
        segments, info = self.model.transcribe(
            audio, language=language, beam_size=1, word_timestamps=words, vad_filter=False,
            initial_prompt=prompt or None,
        )
        segments = list(segments)
        return Transcript(
            text=" ".join(s.text.strip() for s in segments if s.text.strip()),
            language=info.language,
            duration=len(audio) / RATE,
            segments=tuple(Segment(float(s.start), float(s.end), s.text.strip())
                           for s in segments),
            words=tuple(
                Word(w.word, float(w.start), float(w.end), float(w.probability))
                for s in segments for w in (s.words or [])
            ),
            language_probability=1.0 if language else float(info.language_probability),
            window="full",
        )

    def stream(self, *, start_sample: int = 0, language: str | None = None,
               partial_interval: float | None = PARTIAL_INTERVAL, words: bool = False) -> ASRStream:
        """A streaming transcriber for one user turn (see `asr_stream.ASRStream`)."""
        return ASRStream(self, start_sample=start_sample, language=language,
                         partial_interval=partial_interval, words=words)

