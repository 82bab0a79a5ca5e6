"""TTS benchmark: real-time factor and time to first audio of streaming synthesis.

Measured on a warm voice (loaded and used once before timing). Time to first audio is
from the moment the first text delta is offered to the moment the first clause's audio
is ready, with a paragraph arriving word by word as fast as the splitter takes it: the
synthesiser's own latency, not the LLM's.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from agent.config import Settings
from agent.speech.tts import TTSEngine

PARAGRAPH = (
    "Thanks for calling. Your table for four is booked for Friday at seven in the evening, "
    "and we have noted that one of your guests needs a gluten free menu. If your plans "
    "change, just call us back or reply to the confirmation message, and we will update "
    "the booking for you. Is there anything else I can help you with today?"
)
FIRST_AUDIO_TARGET_MS = 150.0
RTF_TARGET = 0.06


async def _first_audio_seconds(engine: TTSEngine, speed: float) -> float:
    async def deltas():
        for word in PARAGRAPH.split(" "):
            yield word + " "

    start = time.perf_counter()
    stream = engine.stream(deltas(), speed=speed)
    try:
        await anext(stream)
        return time.perf_counter() - start
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


# Speeds whose length is compared with speed 1's.
SPEEDS = (0.25, 0.5, 2.0, 3.0, 4.0)


def _rtf(engine: TTSEngine, repeats: int) -> tuple[float, float, float]:
    """Median wall-clock and CPU-time real-time factors, and the paragraph's duration.

    CPU time barely moves when other processes share the cores; wall time does.
    """
    wall, cpu, audio = [], [], 0.0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        pcm, rate = engine.synthesize(PARAGRAPH)
        audio = len(pcm) / rate
        wall.append((time.perf_counter() - start) / audio)
        cpu.append((time.process_time() - start_cpu) / audio)
    return statistics.median(wall), statistics.median(cpu), audio


def bench_tts(settings: Settings, quick: bool = False) -> list[dict]:
    """Rows {metric, value, unit, target} for the speech benchmark table."""
    start = time.perf_counter()
    engine = TTSEngine(settings)
    try:
        engine.load()
        load_s = time.perf_counter() - start
        engine.synthesize(PARAGRAPH)  # warm-up: first runs allocate onnxruntime buffers
        rtf, cpu_rtf, audio_s = _rtf(engine, 1 if quick else 3)
        rows = [
            {"metric": "TTS voice load, cold (joe, incl. speed calibration)",
             "value": round(load_s, 2), "unit": "s", "target": None},
            {"metric": f"TTS real-time factor ({audio_s:.0f} s paragraph, speed 1.0)",
             "value": round(rtf, 3), "unit": "×", "target": f"≤ {RTF_TARGET}"},
            {"metric": "TTS CPU seconds per second of audio (same run)",
             "value": round(cpu_rtf, 3), "unit": "", "target": None},
        ]
        for speed in SPEEDS:
            start = time.perf_counter()
            pcm, rate = engine.synthesize(PARAGRAPH, speed=speed)
            took = time.perf_counter() - start
            rows.append({
                "metric": f"TTS length at speed {speed} ÷ (speed-1 length / {speed}); "
                          f"real-time factor {took / (len(pcm) / rate):.3f} ×",
                "value": round(len(pcm) / rate / (audio_s / speed), 3), "unit": "",
                "target": "0.9–1.1",
            })
        for speed in (1.0, 2.0, 4.0):
            times = [asyncio.run(_first_audio_seconds(engine, speed))
                     for _ in range(3 if quick else 10)]
            rows.append({
                "metric": f"TTS time to first audio (streamed text, speed {speed})",
                "value": round(statistics.median(times) * 1000, 1),
                "unit": "ms",
                "target": f"≤ {FIRST_AUDIO_TARGET_MS:.0f}",
            })
        return rows
    finally:
        engine.close()
