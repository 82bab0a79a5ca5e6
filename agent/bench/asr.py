"""ASR benchmark: latency of one-shot transcription and of the end of a realtime turn.

Speech is Piper (joe) resampled to 16 kHz; every timing is on a warm model.

- One-shot latency: wall time of `ASREngine.transcribe` (with word timings) on clips of
  about 1, 3 and 10 s, for the short window and for plain faster-whisper (30 s window) in
  the same run. The real-time factor is latency / clip length on the 10 s clip.
- End of turn: a ~2 s sentence with 0.5 s of quiet before and 1 s after is fed in 20 ms
  chunks paced by the wall clock, through `VadStream` (server_vad defaults: threshold 0.5,
  prefix 300 ms, silence 500 ms) and `ASRStream` (partials on, as in a session), exactly
  as the realtime session wires them. The clock starts when the last voiced sample (from
  the TTS output's energy, 40 dB below peak) would have been spoken, so the 20 ms chunking
  delay counts against us. Reported:
    * "transcript ready": when the end-of-turn pass (the speculation started at the
      pause) finished. This is the ASR latency the 300 ms target is about.
    * "delivered": when `finish()` returned after VAD's speech_stopped. It can never be
      under silence_duration_ms (500 ms): the turn is not over before that.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from agent.audio import resample
from agent.audio.vad import (
    RATE,
    SileroVad,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    VadOptions,
    VadStream,
)
from agent.config import Settings
from agent.speech.asr import ASREngine
from agent.speech.asr_stream import PARTIAL_INTERVAL

CLIPS = {
    1: "Yes, please.",
    3: "My flight to Boston leaves early on Monday morning.",
    10: ("I would like to change my reservation from Friday to Saturday. "
         "Please add one more guest, and make sure the table is near the window. "
         "We will arrive at around half past seven, so please keep it for us."),
}
TURNS = (  # about 2 s each as joe speaks them
    "I would like to pay my electricity bill.",
    "Please cancel my gym subscription.",
    "Book a table for two at seven tonight.",
    "Send the quarterly report to my manager.",
    "What will the weather be like tomorrow?",
)
CHUNK = 320                    # 20 ms, a typical realtime packet
END_OF_TURN_TARGET_MS = 300


def _speak(text: str, settings: Settings) -> np.ndarray:
    from agent.speech.tts import TTSEngine

    engine = TTSEngine(settings)
    try:
        pcm, rate = engine.synthesize(text, "alloy")
    finally:
        engine.close()
    return resample(pcm, rate, RATE).astype(np.float32)


def voiced_end(audio: np.ndarray) -> int:
    """End of the last 10 ms frame within 40 dB of the loudest one."""
    hop = RATE // 100
    frames = len(audio) // hop
    energy = np.square(audio[: frames * hop].reshape(frames, hop)).mean(axis=1)
    return int((np.flatnonzero(energy > energy.max() * 1e-4)[-1] + 1) * hop)


def _median_latency(engine: ASREngine, audio: np.ndarray, window: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.transcribe(audio, words=True, window=window)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _one_shot_rows(engine: ASREngine, clips: dict[int, np.ndarray], repeats: int
                   ) -> list[dict]:
    rows = []
    latency: dict[tuple[int, str], float] = {}
    for size, audio in clips.items():
        seconds = len(audio) / RATE
        for window, label in (("short", "short window"), ("full", "faster-whisper 30 s")):
            latency[size, window] = _median_latency(engine, audio, window, repeats)
            rows.append({"metric": f"ASR latency, {seconds:.1f} s clip ({label})",
                         "value": round(latency[size, window] * 1000), "unit": "ms",
                         "target": None})
    ten = len(clips[10]) / RATE
    for window, label in (("short", "short window"), ("full", "faster-whisper 30 s")):
        rows.append({"metric": f"ASR real-time factor, {ten:.0f} s clip ({label})",
                     "value": round(latency[10, window] / ten, 3), "unit": "×",
                     "target": None})
    return rows


async def _turn(engine: ASREngine, vad: SileroVad, audio: np.ndarray, last_voiced: int,
                partials: bool) -> tuple[float, float, float]:
    """(ready, delivered, after speech_stopped) in seconds; see the module docstring."""
    turn = VadStream(vad, VadOptions(threshold=0.5, prefix_padding_ms=300,
                                     silence_duration_ms=500))
    stream = None
    t0 = time.perf_counter()
    for offset in range(0, len(audio), CHUNK):
        piece = audio[offset:offset + CHUNK]
        await asyncio.sleep(max(0.0, t0 + (offset + len(piece)) / RATE - time.perf_counter()))
        events = turn.feed(piece)
        if stream is not None:
            stream.feed(piece)
        for event in events:
            if isinstance(event, SpeechStarted):
                stream = engine.stream(start_sample=event.sample,
                                       partial_interval=PARTIAL_INTERVAL if partials else None)
                stream.feed(audio[event.sample:offset + len(piece)])
            elif isinstance(event, SpeechPaused) and stream is not None:
                stream.speculate(event.speech_end)
            elif isinstance(event, SpeechStopped) and stream is not None:
                stopped = time.perf_counter()
                await stream.finish(event.speech_end)
                done = time.perf_counter()
                spoken = t0 + last_voiced / RATE
                assert stream.final_ready_at is not None
                return stream.final_ready_at - spoken, done - spoken, done - stopped
    raise RuntimeError("the VAD never ended the turn")


def _turn_rows(engine: ASREngine, vad: SileroVad, turns: list[np.ndarray], repeats: int
               ) -> list[dict]:
    quiet = np.zeros(RATE // 2, np.float32)
    lengths = [len(speech) / RATE for speech in turns]
    about = f"{statistics.mean(lengths):.1f} s turns, n={len(turns) * repeats}"
    rows = []
    for partials in (True, False):
        results = []
        for speech in turns:
            audio = np.concatenate([quiet, speech, quiet, quiet])
            for _ in range(repeats):
                results.append(asyncio.run(
                    _turn(engine, vad, audio, len(quiet) + voiced_end(speech), partials)))
        ready, delivered, after = (np.array(c) * 1000 for c in zip(*results, strict=True))
        mode = f"partials every {PARTIAL_INTERVAL} s" if partials else "no partials"
        rows += [
            {"metric": f"End of turn: transcript ready after last voiced sample, median "
                       f"({mode}; {about})",
             "value": round(float(np.median(ready))), "unit": "ms",
             "target": f"≤ {END_OF_TURN_TARGET_MS}"},
            {"metric": f"End of turn: transcript ready, worst ({mode})",
             "value": round(float(ready.max())), "unit": "ms", "target": None},
            {"metric": f"End of turn: delivered after last voiced sample, median ({mode}; "
                       "waits for silence_duration_ms=500)",
             "value": round(float(np.median(delivered))), "unit": "ms", "target": None},
            {"metric": f"End of turn: wait after speech_stopped, median ({mode})",
             "value": round(float(np.median(after))), "unit": "ms", "target": None},
        ]
    return rows


def bench_asr(settings: Settings, quick: bool = False) -> list[dict]:
    """Rows {metric, value, unit, target} for the speech benchmark table."""
    start = time.perf_counter()
    engine = ASREngine(settings)
    load_s = time.perf_counter() - start
    try:
        vad = SileroVad.from_settings(settings)
        clips = {size: _speak(text, settings) for size, text in CLIPS.items()}
        turns = [_speak(text, settings) for text in TURNS[: 3 if quick else len(TURNS)]]
        for window in ("short", "full"):  # warm-up: first calls allocate CTranslate2 buffers
            engine.transcribe(clips[3], window=window)
        rows = [{"metric": f"ASR model load (whisper base, {engine.device}, "
                           f"{settings.asr_compute_type})",
                 "value": round(load_s, 2), "unit": "s", "target": None}]
        rows += _one_shot_rows(engine, clips, 1 if quick else 3)
        rows += _turn_rows(engine, vad, turns, 1 if quick else 2)
        rows.append({"metric": "ASR short-window passes sent to the full window",
                     "value": engine.fallbacks, "unit": f"of {engine.transcriptions}",
                     "target": None})
        return rows
    finally:
        engine.close()
