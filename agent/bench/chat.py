"""`parley bench chat`: spoken question in, streamed spoken answer out, as a client sees it.

Starts `parley serve` on a free port, sends a ~3 s spoken question as a streaming audio
chat request (pcm16 out), and measures from the moment the request is sent to the first
audio byte and to the end of the stream: 20 requests one at a time, then 20 more from 4
concurrent clients. Prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agent.audio import encode_audio
from agent.bench.speech import _machine
from agent.config import Settings

QUESTION = "Can you tell me what the weather is usually like in Paris in the spring?"
KEY = "sk-bench-chat"


def bench_chat(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    requests = 6 if args.quick else 20
    audio = _question_wav(settings)
    port = _free_port()
    env = dict(os.environ, PARLEY_API_KEYS=KEY, PARLEY_LOG_LEVEL="warning")
    server = subprocess.Popen([str(Path(sys.executable).with_name("parley")), "serve",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_warm(httpx, base)
        body = _body(audio)
        asyncio.run(_measure(base, body, 2, 1))  # warm every path once
        alone = asyncio.run(_measure(base, body, requests, 1))
        together = asyncio.run(_measure(base, body, requests, 4))
    finally:
        server.terminate()
        server.wait(30)
    print(_render(alone, together, len(audio), args.quick))
    return 0


def _question_wav(settings: Settings) -> bytes:
    from agent.speech.tts import TTSEngine

    tts = TTSEngine(settings)
    pcm, rate = tts.synthesize(QUESTION)
    tts.close()
    return encode_audio(pcm, rate, "wav")


def _body(wav: bytes) -> dict:
    return {"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "pcm16"}, "stream": True,
            "temperature": 0, "max_completion_tokens": 60,
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(wav).decode(), "format": "wav"}}]}]}


async def _one(client, base: str, body: dict) -> tuple[float, float]:
    began = time.perf_counter()
    first = None
    async with client.stream("POST", base + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and '"data":"' in line:
                first = time.perf_counter() - began
    total = time.perf_counter() - began
    return (first if first is not None else total), total


async def _measure(base: str, body: dict, count: int, clients: int) -> list[tuple[float, float]]:
    import httpx

    results: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def worker(n: int) -> None:
            for _ in range(n):
                results.append(await _one(client, base, body))

        share = [count // clients + (i < count % clients) for i in range(clients)]
        await asyncio.gather(*(worker(n) for n in share))
    return results


def _wait_warm(httpx, base: str) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).json().get("decoder"):
                return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not warm up in 5 minutes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _render(alone, together, wav_bytes: int, quick: bool) -> str:
    lines = [f"Measured {datetime.date.today().isoformat()} on {_machine()}"
             f"{', --quick' if quick else ''}: a {QUESTION!r} WAV question "
             f"({wav_bytes // 1024} KiB), streaming pcm16 reply, max 60 tokens.", "",
             "| clients | requests | first audio p50 | first audio p95 | total p50 | total p95 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for clients, rows in ((1, alone), (4, together)):
        first = [r[0] for r in rows]
        total = [r[1] for r in rows]
        lines.append(f"| {clients} | {len(rows)} | {_pct(first, 50):.2f} s | "
                     f"{_pct(first, 95):.2f} s | {_pct(total, 50):.2f} s | "
                     f"{_pct(total, 95):.2f} s |")
    lines.append("")
    lines.append("Target: first audio byte ≤ 1.0 s after the request (alone).")
    return "\n".join(lines)
