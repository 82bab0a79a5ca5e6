"""A real `parley serve` process for end-to-end tests, and the official `openai` client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

PARLEY = Path(sys.executable).with_name("parley")
API_KEY = "sk-test-e2e"
# Phone calls (tests/e2e/test_phone.py): the Twilio account's auth token and the greeting.
TWILIO_TOKEN = "e2e-twilio-auth-token"
GREETING = ("Hello, and thank you for calling Parley. I can help you with orders, "
            "deliveries and payments. What can I do for you today?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> str:
    """Base URL of a server with warm engines, its own store and a known API key."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # The decoder runs its default configuration (backend, weights, activations), so these
    # tests hear the answers a user hears.
    env = dict(os.environ, PARLEY_API_KEYS=API_KEY, PARLEY_MAX_AUDIO_SECONDS="60",
               # Same text, same audio: whether Whisper hears a reply right must not hinge
               # on Piper's random prosody (it misheard "Paris" in about one run in fifty).
               PARLEY_TTS_VARIATION="false",
               PARLEY_TOOLS_DATA_DIR=str(tmp_path_factory.mktemp("tools")),
               PARLEY_MAX_AUDIO_BYTES=str(4 * 1024 * 1024), PARLEY_LOG_LEVEL="warning",
               PARLEY_TWILIO_AUTH_TOKEN=TWILIO_TOKEN, PARLEY_TWILIO_GREETING=GREETING)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(PARLEY), "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("server exited:\n" + log.read_text()[-3000:])
        try:
            health = httpx.get(base + "/healthz", timeout=2).json()
            if health.get("decoder"):  # engines warmed: the LLM is loaded last
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not warm up:\n" + log.read_text()[-3000:])
    yield base
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0,
                              timeout=120)


@pytest.fixture(scope="session")
def speak():
    """Text → 16-bit mono WAV bytes at 22,050 Hz, spoken by the bundled Piper voice."""
    from agent.audio import encode_audio
    from agent.config import load_settings
    from agent.speech.tts import TTSEngine

    tts = TTSEngine(load_settings(tts_variation=False))

    def wav_of(text: str) -> bytes:
        return encode_audio(*tts.synthesize(text), "wav")

    yield wav_of
    tts.close()


@pytest.fixture(scope="session")
def asr():
    from agent.config import load_settings
    from agent.speech.asr import ASREngine

    engine = ASREngine(load_settings())
    yield engine
    engine.close()
