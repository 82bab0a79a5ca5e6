"""`parley serve` as a user starts it: a real process on a free port, ready when /healthz
answers 200."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

PARLEY = Path(sys.executable).with_name("parley")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    base: str
    process: subprocess.Popen[str]
    log: IO[str]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def start(env: dict[str, str] | None = None, timeout_s: float = 60,
          ready: tuple[int, ...] = (200,), warm: bool = False) -> Server:
    """A server process, ready once /healthz answers one of `ready` (a server whose store
    is down answers 503), or, with `warm`, once its engines have loaded too."""
    port = free_port()
    # A file, not a pipe: a pipe nobody reads stops a talkative server once it is full.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen([str(PARLEY), "serve", "--port", str(port)],
                            env=dict(os.environ, **(env or {})), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            health = httpx.get(base + "/healthz", timeout=1)
            if health.status_code in ready and (not warm or health.json().get("decoder")):
                return Server(base, proc, log)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    log.seek(0)
    pytest.fail("server did not start: " + log.read()[-3000:])


@contextlib.contextmanager
def serve(env: dict[str, str] | None = None, timeout_s: float = 60,
          ready: tuple[int, ...] = (200,)) -> Iterator[str]:
    """`start`, yielding the base URL, and stop it (SIGTERM) afterwards."""
    server = start(env, timeout_s, ready)
    try:
        yield server.base
    finally:
        server.process.terminate()
        server.process.wait(30)
