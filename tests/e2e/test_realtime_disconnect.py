"""A client that vanishes mid-answer while its session's outbox is full: the session must
still close, and its decoder slot come free, within seconds (a cancelled response used to
wait forever to send its last events into an outbox no one would read again)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import websockets

from tests.server_process import serve

KEY = "sk-disconnect"


def decoder_sessions(base: str) -> int:
    stats = httpx.get(base + "/healthz", timeout=10).json()["decoder"]
    return sum(int(s["sessions"]) + int(s["decoding"]) + int(s["prefilling"])
               for s in stats.values())


def sessions_gauge(base: str) -> float:
    metrics = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("parley_realtime_sessions"))


async def _vanish_mid_answer(base: str) -> None:
    url = base.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"},
                                  open_timeout=60) as ws:
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story about the sea."}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        while True:  # wait until the answer streams audio, then go without a word
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if event["type"] == "response.output_audio.delta":
                break
        ws.transport.abort()  # no close handshake: the connection just drops


def test_a_vanished_client_with_a_full_outbox_frees_its_decoder_slot() -> None:
    # A four-event outbox: full within milliseconds of the writer losing the client.
    with serve({"PARLEY_API_KEYS": KEY, "PARLEY_REALTIME_SEND_QUEUE": "4"}) as base:
        asyncio.run(_vanish_mid_answer(base))
        gone = time.monotonic()
        while decoder_sessions(base):
            assert time.monotonic() - gone < 2.0, httpx.get(base + "/healthz").json()
            time.sleep(0.05)
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200
        while sessions_gauge(base):  # the session itself is closed, not only its slot
            assert time.monotonic() - gone < 2.0, sessions_gauge(base)
            time.sleep(0.05)
