"""Twilio's side of a phone call, played as Twilio plays it, for tests and `parley bench
phone`.

The voice webhook is form-encoded and signed with the account's auth token (the `twilio`
package computes the signature, as Twilio does); the TwiML answer is parsed and its
<Stream> opened with its <Parameter>s; the stream sends `connected`, `start`, then the
caller's audio as 8 kHz µ-law in 20 ms `media` messages at real-time pace. The phone plays
the server's audio at real-time pace, echoes each `mark` once the audio before it has
played, and on `clear` drops what it holds and echoes the pending marks, as Twilio does.
Every message the server sends is checked against schemas/twilio/media_stream.json.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import websockets
from twilio.request_validator import RequestValidator

from agent.json_schema import make_validator, schema

RATE = 8000
FRAME = RATE // 50            # 20 ms of µ-law, one byte a sample
OUTBOUND = make_validator({**schema("twilio/media_stream"),
                           "oneOf": [{"$ref": "#/$defs/outbound"}]})


def sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class OutboundProblem(AssertionError):
    """The server sent a message that is not a Twilio Media Streams message."""


class Phone:
    """One call, as Twilio places it."""

    def __init__(self, base: str, *, sign_with: str | None):
        self.base = base
        self.sign_with = sign_with
        self.account, self.call, self.stream = sid("AC"), sid("CA"), sid("MZ")
        self.ws: Any = None
        self.sequence = 0
        self.heard: list[tuple[float, bytes]] = []   # (when played, µ-law)
        self.clears: list[float] = []
        self.media_at: list[float] = []               # when each media message arrived
        self._queue: list[bytes | str] = []           # audio and mark names, in order
        self._tasks: list[asyncio.Task[None]] = []
        self.problems: list[str] = []

    async def dial(self, **form: str) -> httpx.Response:
        params = {"AccountSid": self.account, "CallSid": self.call, "From": "+15550001111",
                  "To": "+15550002222", "CallStatus": "ringing", "Direction": "inbound",
                  **form}
        url = self.base + "/twilio/voice"
        headers = {}
        if self.sign_with is not None:
            headers["X-Twilio-Signature"] = RequestValidator(
                self.sign_with).compute_signature(url, params)
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.post(url, data=params, headers=headers)

    @staticmethod
    def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
        root = ET.fromstring(twiml)
        stream = root.find("./Connect/Stream")
        assert stream is not None, twiml
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return stream.get("url", ""), parameters

    async def answer(self, url: str, parameters: dict[str, str]) -> None:
        """Open the media stream as the TwiML says, and start the phone's speaker."""
        self.ws = await websockets.connect(url, open_timeout=60)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send({"event": "start", "sequenceNumber": self._next(),
                          "streamSid": self.stream, "start": {
                              "accountSid": self.account, "streamSid": self.stream,
                              "callSid": self.call, "tracks": ["inbound"],
                              "customParameters": parameters, "mediaFormat": {
                                  "encoding": "audio/x-mulaw", "sampleRate": 8000,
                                  "channels": 1}}})
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._play())]

    async def call_in(self) -> None:
        response = await self.dial()
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/xml")
        await self.answer(*self.stream_of(response.text))

    async def say(self, audio: bytes) -> float:
        """Send `audio` at real-time pace in 20 ms media messages; returns when it began."""
        began = time.monotonic()
        for n, at in enumerate(range(0, len(audio), FRAME)):
            await self._send({"event": "media", "sequenceNumber": self._next(),
                              "streamSid": self.stream, "media": {
                                  "track": "inbound", "chunk": str(n + 1),
                                  "timestamp": str(n * 20),
                                  "payload": base64.b64encode(audio[at:at + FRAME]).decode()}})
            await asyncio.sleep(max(0.0, began + (n + 1) * 0.02 - time.monotonic()))
        return began

    async def press(self, digit: str) -> None:
        await self._send({"event": "dtmf", "streamSid": self.stream,
                          "sequenceNumber": self._next(),
                          "dtmf": {"track": "inbound_track", "digit": digit}})

    async def hang_up(self) -> None:
        await self._send({"event": "stop", "sequenceNumber": self._next(),
                          "streamSid": self.stream,
                          "stop": {"accountSid": self.account, "callSid": self.call}})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is not None:
            await self.ws.close()

    async def wait_for_audio(self, after: float, timeout: float = 60) -> float:
        """When the first media message after `after` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for t in self.media_at if t > after]
            if later:
                return later[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no audio within {timeout} s")

    async def wait_quiet(self, after: float, quiet_s: float = 2.0, timeout: float = 90) -> None:
        """Wait until audio came after `after` and then none for `quiet_s`."""
        deadline = time.monotonic() + timeout
        await self.wait_for_audio(after, timeout)
        while time.monotonic() < deadline:
            if self.media_at and time.monotonic() - self.media_at[-1] > quiet_s \
                    and not self._queue:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the answer did not end")

    def played_since(self, since: float) -> bytes:
        return b"".join(audio for at, audio in self.heard if at >= since)

    # -- the wire --------------------------------------------------------------------------

    def _next(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def _receive(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            errors = list(OUTBOUND.iter_errors(message))
            if errors or message["streamSid"] != self.stream:
                self.problems.append(f"{message}: {errors[0].message if errors else 'sid'}")
                raise OutboundProblem(self.problems[-1])
            if message["event"] == "media":
                self.media_at.append(time.monotonic())
                self._queue.append(base64.b64decode(message["media"]["payload"]))
            elif message["event"] == "mark":
                self._queue.append(message["mark"]["name"])
            elif message["event"] == "clear":
                self.clears.append(time.monotonic())
                marks = [m for m in self._queue if isinstance(m, str)]
                self._queue.clear()
                for name in marks:  # Twilio echoes the marks a clear dropped
                    await self._echo(name)

    async def _play(self) -> None:
        """The phone's speaker: 20 ms of audio every 20 ms; a mark is echoed once the
        audio before it has played."""
        buffered = b""
        tick = time.monotonic()
        while True:
            while self._queue and isinstance(self._queue[0], str) and not buffered:
                await self._echo(self._queue.pop(0))  # type: ignore[arg-type]
            while len(buffered) < FRAME and self._queue and isinstance(self._queue[0], bytes):
                buffered += self._queue.pop(0)  # type: ignore[operator]
            if buffered:
                frame, buffered = buffered[:FRAME], buffered[FRAME:]
                self.heard.append((time.monotonic(), frame))
            tick += 0.02
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    async def _echo(self, name: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._send({"event": "mark", "sequenceNumber": self._next(),
                              "streamSid": self.stream, "mark": {"name": name}})
