"""Keys kept as their hash, with scopes (agent.api_keys), and the HTTP front's use of them."""

from __future__ import annotations

import json

import pytest

from agent.api_keys import (
    key_digest,
    key_is_valid,
    key_scopes,
    principal_of,
    principals,
    scope_of,
    tool_patterns,
)
from agent.config import load_settings
from agent.errors import ConfigError
from agent.front.auth import APIKeyMiddleware

SCOPED = "sk-scoped-secret-value"


def _settings(**table):
    keys = {"bot": {"hash": "sha256:" + key_digest(SCOPED), **table}}
    return load_settings(api_keys="sk-plain", keys=keys)


def test_a_hashed_key_acts_as_its_principal_and_a_plain_key_as_itself():
    settings = _settings(tools=["search_*"], requests_per_minute=5, max_sessions=1,
                         execute_tools=True)
    principal = principal_of(SCOPED, settings)
    assert principal == "sha256:" + key_digest(SCOPED)
    assert SCOPED not in principal and key_is_valid(SCOPED, settings)
    assert principal_of("sk-plain", settings) == "sk-plain"
    assert principal_of("sk-wrong", settings) is None and not key_is_valid(None, settings)
    scope = scope_of(principal, settings)
    assert scope is not None and scope.name == "bot" and scope.requests_per_minute == 5
    assert scope.max_sessions == 1 and scope.execute_tools
    assert scope_of("sk-plain", settings) is None
    assert tool_patterns(settings) == {principal: ("search_*",)}
    assert principals(settings) == ["sk-plain", principal]


def test_endpoints_scope():
    scope = key_scopes(_settings(endpoints=["chat", "realtime"]))[0]
    assert scope.allows("chat") and scope.allows("realtime") and not scope.allows("speech")
    assert key_scopes(_settings())[0].allows("speech")     # no list: every endpoint


@pytest.mark.parametrize("table, problem", [
    ({"hash": "sk-plain-text"}, "hash"),
    ({"endpoints": ["chat", "teleport"]}, "endpoints"),
    ({"tools": "search_*"}, "tools"),
    ({"requests_per_minute": -1}, "requests_per_minute"),
    ({"colour": "blue"}, "unknown"),
])
def test_a_wrong_scope_is_a_config_error(table, problem):
    with pytest.raises(ConfigError, match=problem):
        key_scopes(_settings(**table))


def test_scopes_come_from_the_toml_file(tmp_path):
    config = tmp_path / "parley.toml"
    config.write_text(f'[keys.bot]\nhash = "sha256:{key_digest(SCOPED)}"\n'
                      'endpoints = ["models"]\nrequests_per_minute = 3\n')
    settings = load_settings(config)
    assert key_scopes(settings)[0].endpoints == frozenset({"models"})


async def _call(middleware, path: str, key: str) -> tuple[int, dict, dict]:
    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope.get("state", {}))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "method": "GET",
             "headers": [(b"authorization", f"Bearer {key}".encode())]}
    await middleware(app)(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], seen, json.loads(body or b"{}")


async def test_the_front_passes_the_principal_on_and_holds_a_key_to_its_endpoints():
    settings = _settings(endpoints=["models"])

    def middleware(app):
        return APIKeyMiddleware(app, settings=settings)

    status, state, _ = await _call(middleware, "/v1/models", SCOPED)
    assert status == 200 and state["api_key"] == principal_of(SCOPED, settings)
    status, state, body = await _call(middleware, "/v1/chat/completions", SCOPED)
    assert status == 403 and not state
    assert body["error"]["code"] == "insufficient_permissions"
    assert (await _call(middleware, "/v1/chat/completions", "sk-plain"))[0] == 200
