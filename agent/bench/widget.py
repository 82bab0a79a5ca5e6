"""`parley bench widget`: the browser widget in a real Chromium, as a visitor hears it.

Debian's Chromium (headless, driven by Playwright) opens the demo page `GET /widget/` of a
`parley serve` it starts, and presses Start. Its microphone is Chromium's fake capture
device playing a WAV of ours (`--use-file-for-fake-audio-capture`): the realtime bench's
questions spoken by the bundled voice, each followed by silence long enough for the
answer, then a request for a story that the next question talks over. The widget itself
reports what it measured on the page's audio clock (its `parley-timing` events):

    voice to voice = the first answer sample played (+ the output latency the browser
                     reports) − the end of the last loud 2.7 ms of the question as the
                     microphone worklet heard it
    barge-in stop  = the moment playback fell silent − the onset of the speech over it

and splits each turn (medians) where the page saw it on the same clock: the voice ended →
`speech_stopped` arrived (the server VAD's silence) → the first answer audio arrived (the
server's work) → its first sample played (the jitter buffer and the output latency). The
user's final transcripts are scored against the spoken text (agent.bench.wer).

Runs once with the widget's automatic choice (Opus through WebCodecs in Chromium) and once
with PCM16, in one server, side by side, after one uncounted warm-up turn with each.
`--screenshots DIR` saves the widget in each of its states. The browser session is shared
with the e2e tests (tests/e2e/test_widget.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import Settings

CAPTURE_RATE = 48_000
LEAD_S = 2.0          # silence before the first question: the widget connects meanwhile
ANSWER_GAP_S = 9.0    # silence after a question: its answer plays in it
STORY = "Can you tell me a story about a brave little dragon?"
TALK_OVER = "Wait, stop. What is the capital of France?"
TALK_OVER_AFTER_S = 3.0  # after the story request ends: about 1.5 s into the story
EVENTS = ("parley-state", "parley-user-transcript", "parley-assistant-transcript",
          "parley-error", "parley-timing")
# The stages of a turn from the widget's stats.turns, as (earlier, later) pairs.
STAGES = (("voiceEnded", "speechStopped"), ("speechStopped", "firstAudio"),
          ("firstAudio", "played"))
STATES = ("connecting", "listening", "user-speaking", "thinking", "speaking", "error")

# Runs in the page before its own scripts: records the widget's events and what crosses
# the WebSocket (but the audio itself), on the page's clock.
RECORDER = """
(() => {
  const record = window.__parley = { events: [], sent: [], received: [] };
  for (const name of EVENT_NAMES) {
    document.addEventListener(name, (e) => record.events.push(
      { name, t: performance.now(), detail: e.detail }));
  }
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (!this.__parleyRecorded) {
      this.__parleyRecorded = true;
      record.url = String(this.url);
      record.protocol = () => this.protocol;
      this.addEventListener("message", (m) => {
        const e = JSON.parse(m.data);
        if (e.type.endsWith(".delta")) return;
        record.received.push({ t: performance.now(), event: e });
      });
    }
    const e = JSON.parse(data);
    if (e.type !== "input_audio_buffer.append") {
      record.sent.push({ t: performance.now(), event: e });
    }
    return send.call(this, data);
  };
})();
""".replace("EVENT_NAMES", json.dumps(list(EVENTS)))


@dataclass(frozen=True)
class Segment:
    text: str | None      # spoken, or None for silence
    seconds: float = 0.0  # silence only


@dataclass
class PageRecord:
    """What one widget session did, as the page saw it."""

    events: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    transcript: list[dict[str, str]] = field(default_factory=list)   # the widget's log
    error_line: str = ""
    subprotocol: str = ""
    console: list[str] = field(default_factory=list)

    def states(self) -> list[str]:
        return [e["detail"]["state"] for e in self.events if e["name"] == "parley-state"]

    def timings(self, name: str) -> list[int]:
        return [e["detail"]["ms"] for e in self.events
                if e["name"] == "parley-timing" and e["detail"]["name"] == name]

    def finals(self, side: str) -> list[str]:
        return [e["detail"]["text"] for e in self.events
                if e["name"] == f"parley-{side}-transcript" and e["detail"]["final"]]

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [s["event"] for s in self.sent if s["event"]["type"] == kind]

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        return [r["event"] for r in self.received if r["event"]["type"] == kind]


def chromium_path() -> str:
    found = os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not found:
        raise FileNotFoundError("Chromium is not installed (Debian: apt-get install chromium; "
                                "or set PARLEY_CHROMIUM to its path)")
    return found


def write_capture(segments: Sequence[Segment], path: Path, settings: Settings) -> list[float]:
    """The fake microphone's WAV (16-bit mono, 48 kHz); returns where each spoken segment's
    voice ends, in seconds from the start."""
    from agent.audio import resample
    from agent.bench.realtime import voiced_span
    from agent.speech.tts import TTSEngine

    tts = TTSEngine(settings)
    parts: list[np.ndarray] = []
    ends: list[float] = []
    at = 0
    try:
        for segment in segments:
            if segment.text is None:
                audio = np.zeros(int(segment.seconds * CAPTURE_RATE), np.float32)
            else:
                pcm, rate = tts.synthesize(segment.text)
                audio = resample(pcm, rate, CAPTURE_RATE)
                start, end = voiced_span(audio, CAPTURE_RATE)
                audio = audio[start:end]
                ends.append((at + len(audio)) / CAPTURE_RATE)
            parts.append(audio)
            at += len(audio)
    finally:
        tts.close()
    samples = np.clip(np.concatenate(parts), -1.0, 1.0)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(CAPTURE_RATE)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return ends


def browser_args(capture: Path | None, *, allow_microphone: bool = True) -> list[str]:
    """Headless Chromium flags: no sandbox (root in CI), nothing fetched from the network,
    the fake capture device (playing `capture` once, where given), and the permission
    prompt answered yes, or no where not `allow_microphone`."""
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required", "--use-fake-device-for-media-stream"]
    if capture is not None:
        args.append(f"--use-file-for-fake-audio-capture={capture}%noloop")
    args.append("--use-fake-ui-for-media-stream" if allow_microphone
                else "--deny-permission-prompts")
    return args


@contextlib.asynccontextmanager
async def chromium(capture: Path | None, *, allow_microphone: bool = True) -> Any:
    """A headless Debian Chromium under Playwright (no browser download)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=browser_args(capture, allow_microphone=allow_microphone))
        try:
            yield browser
        finally:
            await browser.close()


async def talk(browser: Any, page_url: str, *, seconds: float,
               attributes: dict[str, str] | None = None, before: str = "",
               until: str | None = None, stop_in: str | None = None,
               screenshots: Path | None = None, start_with_keyboard: bool = False
               ) -> PageRecord:
    """Open `page_url`, set the widget's `attributes`, press Start and record for
    `seconds` (or until an event named `until`); `before` is more script to run first.
    `stop_in`: press Stop the first time the widget is in that state, then record one
    second more."""
    context = await browser.new_context()
    page = await context.new_page()
    record = PageRecord()
    page.on("console", lambda message: record.console.append(message.text))
    page.on("pageerror", lambda error: record.console.append(f"page error: {error}"))
    await page.add_init_script(RECORDER + before)
    await page.goto(page_url)
    widget = page.locator("parley-voice")
    for name, value in (attributes or {}).items():
        await widget.evaluate("(el, [n, v]) => el.setAttribute(n, v)", [name, value])
    if screenshots is not None:
        await widget.screenshot(path=str(screenshots / "widget-idle.png"))
    if start_with_keyboard:
        await page.keyboard.press("Tab")
        await page.keyboard.press("Enter")
    else:
        await widget.locator("button").click()
    shot: set[str] = set()
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        state = await widget.evaluate("el => el.state")
        if screenshots is not None and state not in shot:
            path = screenshots / f"widget-{state}.png"
            await widget.screenshot(path=str(path))
            if await widget.evaluate("el => el.state") == state:
                shot.add(state)
            else:  # the state moved on while the picture was taken: it shows the next one
                path.unlink()
        if until is not None and await page.evaluate(
                "(name) => window.__parley.events.some((e) => e.name === name)", until):
            break
        if stop_in is not None and state == stop_in:
            await widget.locator("button").click()
            stop_in = None
            deadline = min(deadline, asyncio.get_running_loop().time() + 1.0)
        await asyncio.sleep(0.05)
    raw = await page.evaluate("""() => { const r = window.__parley; return {
        events: r.events, sent: r.sent, received: r.received,
        subprotocol: r.protocol ? r.protocol() : "" }; }""")
    record.events, record.sent, record.received = raw["events"], raw["sent"], raw["received"]
    record.subprotocol = raw["subprotocol"]
    record.stats = await widget.evaluate("el => el.stats")
    record.transcript = await widget.evaluate("""el => [...el.shadowRoot.querySelectorAll(
        '.log li')].map((li) => ({ role: li.classList.contains('user') ? 'user' : 'assistant',
        text: li.dataset.text, partial: li.classList.contains('partial') }))""")
    record.error_line = await page.locator("parley-voice .error").inner_text()
    await widget.evaluate("el => el.stop()")
    await context.close()
    return record


# -- the benchmark ------------------------------------------------------------------------


def bench_segments(questions: Sequence[str]) -> list[Segment]:
    segments = [Segment(None, LEAD_S)]
    for text in questions:
        segments += [Segment(text), Segment(None, ANSWER_GAP_S)]
    segments += [Segment(STORY), Segment(None, TALK_OVER_AFTER_S), Segment(TALK_OVER),
                 Segment(None, ANSWER_GAP_S)]
    return segments


def _p50(values: Sequence[float]) -> float | None:
    from agent.bench.realtime import percentile

    return percentile(values, 50)


def _row(codec: str, record: PageRecord, spoken: Sequence[str]) -> str:
    from agent.bench.realtime import _fmt_ms
    from agent.bench.wer import word_errors

    turns = len(spoken) - 2          # the story and the talk-over are not timed turns
    latencies = record.timings("voice-to-voice")[:turns]
    barge = record.timings("barge-in")
    truncates = record.sent_of("conversation.item.truncate")
    heard = record.finals("user")
    errors = words = 0
    for index, text in enumerate(spoken):
        wrong, count = word_errors(text, heard[index] if index < len(heard) else "")
        errors, words = errors + wrong, words + count
    played = sum(1 for ms in record.stats.get("playedMs", {}).values() if ms > 0)
    stages = [_p50([1000 * (turn[later] - turn[earlier])
                    + (1000 * turn["outputLatency"] if later == "played" else 0)
                    for turn in record.stats.get("turns", [])[:turns]])
              for earlier, later in STAGES]
    return (f"| {codec} | {played}/{len(spoken)} | {_fmt_ms(_p50(latencies))} | "
            f"{_fmt_ms(max(latencies, default=None))} | "
            + " | ".join(_fmt_ms(stage) for stage in stages) + " | "
            f"{_fmt_ms(barge[0] if barge else None)} | {len(truncates)} | "
            f"{errors}/{words} ({100 * errors / max(words, 1):.1f}%) |")


def bench_widget(settings: Settings, args: argparse.Namespace) -> int:
    from agent.bench.realtime import QUESTIONS, _server

    questions = list(QUESTIONS)
    spoken = [*questions, STORY, TALK_OVER]
    segments = bench_segments(questions)
    seconds = sum(s.seconds for s in segments) + 3.0 * len(spoken) + 8
    screenshots = Path(args.screenshots) if getattr(args, "screenshots", None) else None
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parley-bench-widget-") as folder:
        capture = Path(folder) / "capture.wav"
        write_capture(segments, capture, settings)
        warm_up = Path(folder) / "warm-up.wav"
        write_capture([Segment(None, LEAD_S), Segment(questions[2]), Segment(None, 6.0)],
                      warm_up, settings)
        log_path = Path(folder) / "server.log"
        with open(log_path, "wb") as log, \
                _server(args, args.backend or settings.llm_backend, log) as base:
            _wait_ready(base)
            # Every path once, uncounted: the first session of a server pays for warm-up.
            for codec in ("auto", "pcm16"):
                asyncio.run(_bench_once(base, warm_up, codec, 12.0, None))
            rows = []
            for codec in ("auto", "pcm16"):
                record = asyncio.run(_bench_once(base, capture, codec, seconds, screenshots
                                                 if codec == "auto" else None))
                chosen = record.stats.get("codec") or "?"
                rows.append(_row(f"{chosen} (auto)" if codec == "auto" else chosen, record,
                                 spoken))
                for side in ("user", "assistant"):
                    for text in record.finals(side):
                        print(f"  {codec} {side}: {text}", file=sys.stderr)
            if screenshots is not None:
                asyncio.run(_refused(base, screenshots))
    cpu = platform.processor() or platform.machine()
    print(f"\n`parley bench widget`, {datetime.date.today()}, {cpu}, "
          f"Chromium {_chromium_version()}: {len(questions)} timed turns, then a story "
          f"talked over\n")
    print("| microphone codec | answers played | voice to voice p50 | max | "
          "voice ended → speech_stopped | → first answer audio | → first sample heard | "
          "talk-over → silence | truncates sent | user words misheard |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


async def _refused(base: str, screenshots: Path) -> None:
    """The widget's error state, for the screenshots: the microphone refused."""
    async with chromium(None, allow_microphone=False) as browser:
        await talk(browser, base + "/widget/", seconds=10, until="parley-error",
                   screenshots=screenshots)


async def _bench_once(base: str, capture: Path, codec: str, seconds: float,
                      screenshots: Path | None) -> PageRecord:
    from agent.bench.realtime import INSTRUCTIONS

    async with chromium(capture) as browser:
        return await talk(browser, base + "/widget/", seconds=seconds,
                          attributes={"codec": codec, "instructions": INSTRUCTIONS},
                          screenshots=screenshots)


def _wait_ready(base: str, timeout_s: float = 300) -> None:
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).json().get("decoder"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {base} did not warm up in {timeout_s:.0f} s")


def _chromium_version() -> str:
    import subprocess

    try:
        out = subprocess.run([chromium_path(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    words = [w for w in out.split() if w[:1].isdigit()]
    return words[0] if words else "?"
