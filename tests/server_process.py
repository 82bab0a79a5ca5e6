"""`parley serve` as a user starts it: a real process on a free port, ready when /healthz
answers 200."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PARLEY = Path(sys.executable).with_name("parley")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(env: dict[str, str] | None = None, timeout_s: float = 60,
          ready: tuple[int, ...] = (200,)) -> Iterator[str]:
    """A server process, ready once /healthz answers one of `ready` (a server whose store
    is down answers 503); yields its base URL, and stops it (SIGTERM) afterwards."""
    port = free_port()
    proc = subprocess.Popen([str(PARLEY), "serve", "--port", str(port)],
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code in ready:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not start: " + (proc.stdout.read() if proc.stdout else ""))
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
