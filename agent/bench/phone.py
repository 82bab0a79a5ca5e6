"""`parley bench phone`: phone calls through the Twilio bridge, as callers hear them.

Starts `parley serve` with Twilio on, then for 1 and 4 concurrent calls each caller is
Twilio (agent.bench.twilio_phone): a signed webhook, the TwiML's stream opened with its
parameters, the caller's speech sent as 8 kHz µ-law in 20 ms messages at real-time pace,
the server's audio played at real-time pace with its marks echoed. Each call hears the
greeting, talks over it with its first question after a second, then asks the rest one
after another, each once the answer has played and a half-second pause.

    talk-over → clear = `clear` received − the moment the caller's voice began
    voice to voice    = first `media` received after the question
                        − the moment the last voiced 20 ms of it was sent

so voice to voice includes the end-of-turn silence the server VAD waits for. Questions are
the realtime bench's, spoken by the bundled voice (and the recorded question), resampled
to 8 kHz and trimmed to their voiced span. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.bench.realtime import Question, _questions, _server, percentile
from agent.bench.twilio_phone import FRAME, RATE, Phone
from agent.config import Settings

TWILIO_TOKEN = "bench-twilio-auth-token"
GREETING = ("Hello, and thank you for calling. I can help you with orders, deliveries and "
            "payments. What can I do for you today?")
TALK_OVER_AFTER_S = 1.0
PAUSE_S = 0.5
QUIET_S = 1.0      # no audio for this long after an answer began: it has ended


@dataclass
class CallResult:
    clear_ms: float | None = None
    voice_to_voice_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Spoken:
    audio: bytes       # µ-law 8 kHz, whole 20 ms frames, ending with the voice
    onset_s: float     # where the voice begins in it


def as_mulaw(question: Question) -> Spoken:
    """The question's pcm16 24 kHz as µ-law 8 kHz, padded in front to whole frames."""
    from agent.audio import encode_audio, resample
    from agent.bench.realtime import voiced_span

    pcm = resample(np.frombuffer(question.pcm, "<i2").astype(np.float32) / 32768,
                   24_000, RATE)
    pad = -len(pcm) % FRAME
    pcm = np.concatenate([np.zeros(pad, np.float32), pcm])
    return Spoken(encode_audio(pcm, RATE, "g711_ulaw"), voiced_span(pcm, RATE)[0] / RATE)


SILENCE = b"\xff" * FRAME  # µ-law zero


async def _speak_then_quiet(phone: Phone, audio: bytes, quiet_s: float) -> float:
    """Send `audio` then `quiet_s` of silence; returns when its last frame was sent."""
    await phone.say(audio)
    ended = time.monotonic()
    await phone.say(SILENCE * int(quiet_s * 50))
    return ended


async def _call(base: str, questions: Sequence[Spoken], turns: int, offset: int
                ) -> CallResult:
    result = CallResult()
    phone = Phone(base, sign_with=TWILIO_TOKEN)
    try:
        await phone.call_in()
        await phone.wait_for_audio(0, timeout=120)  # the greeting
        await asyncio.sleep(TALK_OVER_AFTER_S)
        for turn in range(turns):
            question = questions[(offset + turn) % len(questions)]
            talk_over = turn == 0
            voice_at = time.monotonic() + question.onset_s
            speaking = asyncio.create_task(_speak_then_quiet(phone, question.audio, 1.5))
            if talk_over:
                while not phone.clears and not speaking.done():
                    await asyncio.sleep(0.01)
                if phone.clears:
                    result.clear_ms = (phone.clears[0] - voice_at) * 1000
                else:
                    result.failures.append("talking over the greeting sent no clear")
            ended = await speaking
            first = await phone.wait_for_audio(ended, timeout=120)
            result.voice_to_voice_ms.append((first - ended) * 1000)
            await phone.wait_quiet(ended, quiet_s=QUIET_S)
            await asyncio.sleep(PAUSE_S)
        await phone.hang_up()
    except Exception as exc:  # a failed call is a row's failure, not the bench's end
        result.failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        await phone.close()
        result.failures += phone.problems
    return result


async def _level(base: str, questions: Sequence[Spoken], calls: int, turns: int
                 ) -> list[CallResult]:
    return list(await asyncio.gather(*(_call(base, questions, turns, n)
                                       for n in range(calls))))


def bench_phone(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from agent.bench.chat import _wait_warm

    quick = bool(getattr(args, "quick", False))
    turns = 2 if quick else 4
    questions = [as_mulaw(q) for q in _questions(settings)]
    load = os.getloadavg()[0]
    rows = []
    handle, name = tempfile.mkstemp(prefix="parley-bench-phone-", suffix=".log")
    os.close(handle)
    twilio = {"PARLEY_TWILIO_AUTH_TOKEN": TWILIO_TOKEN, "PARLEY_TWILIO_GREETING": GREETING}
    with Path(name).open("wb") as log, \
            _server(args, settings.llm_backend, log, twilio) as base:
        _wait_warm(httpx, base)
        for calls in (1, 4):
            results = asyncio.run(_level(base, questions, calls, turns))
            rows.append((calls, results))
            print(f"  {calls} call(s): done", file=sys.stderr)
    for _, results in rows:
        for result in results:
            for failure in result.failures:
                print(f"  failed: {failure}", file=sys.stderr)
    print(render(rows, settings, quick, load))
    return 0


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def render(rows: Sequence[tuple[int, list[CallResult]]], settings: Settings, quick: bool,
           load: float) -> str:
    from agent.bench.speech import _machine

    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
             f"{_machine()} with `parley bench phone{' --quick' if quick else ''}`: "
             f"{settings.llm_model}, server VAD silence {settings.vad_silence_duration_ms} "
             f"ms, load average {load:.1f} when it began.", "",
             "| calls | turns | voice-to-voice p50 | p95 | talk-over → clear p50 | p95 "
             "| failed |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for calls, results in rows:
        v2v = [v for r in results for v in r.voice_to_voice_ms]
        clears = [r.clear_ms for r in results if r.clear_ms is not None]
        failed = sum(bool(r.failures) for r in results)
        p50 = statistics.median(v2v) if v2v else None
        mark = "" if p50 is None or calls != 1 else (" ✓" if p50 <= 800 else " ✗")
        clear50 = statistics.median(clears) if clears else None
        clear_mark = "" if clear50 is None else (" ✓" if clear50 <= 600 else " ✗")
        lines.append(f"| {calls} | {len(v2v)} | {_ms(p50)}{mark} | "
                     f"{_ms(percentile(v2v, 95))} | {_ms(clear50)}{clear_mark} | "
                     f"{_ms(percentile(clears, 95))} | {failed} |")
    lines += ["", "Targets: voice to voice p50 ≤ 800 ms for one call; `clear` ≤ 600 ms after "
              "the caller's voice begins."]
    return "\n".join(lines)
