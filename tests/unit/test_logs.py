"""Structured logs (agent.logs): ids in every line, nothing secret or bulky in any."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from agent import logs
from agent.errors import ConfigError


def _record(message: str, *args, fields=None, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("agent.realtime.session", logging.INFO, __file__, 1, message,
                               args, exc_info)
    if fields is not None:
        record.fields = fields
    return record


def test_a_json_line_carries_the_ids_and_the_fields():
    token = logs.session_id.set("sess_1"), logs.conversation_id.set("conv_2")
    try:
        line = json.loads(logs.JsonFormatter().format(_record(
            "response %s %s", "resp_3", "completed",
            fields={"event": "turn", "voice_to_voice_ms": 612})))
    finally:
        logs.session_id.reset(token[0])
        logs.conversation_id.reset(token[1])
    assert line["message"] == "response resp_3 completed"
    assert line["level"] == "info" and line["logger"] == "agent.realtime.session"
    assert (line["session_id"], line["conversation_id"]) == ("sess_1", "conv_2")
    assert line["event"] == "turn" and line["voice_to_voice_ms"] == 612
    assert line["time"].endswith("Z") and "request_id" not in line


@pytest.mark.parametrize("formatter", [logs.JsonFormatter(), logs.TextFormatter()])
def test_keys_secrets_and_audio_never_reach_a_line(formatter):
    audio = base64.b64encode(bytes(range(256)) * 4).decode()
    text = formatter.format(_record(
        "key %s secret %s header %s audio %s", "sk-live-abcdef123456", "ek_9f8e7d6c5b4a3",
        "Bearer sk-other-0000111122", audio,
        fields={"nested": {"auth": "ek_abcdefghijkl"}, "list": ["sk-abcdefgh"]}))
    for leaked in ("abcdef123456", "9f8e7d6c5b4a3", "0000111122", "abcdefghijkl",
                   "sk-abcdefgh", audio[:50]):
        assert leaked not in text
    assert "[redacted]" in text and "base64 characters]" in text


def test_an_exception_is_scrubbed_too():
    try:
        raise ValueError("bad key sk-123456789abc")
    except ValueError:
        import sys

        line = json.loads(logs.JsonFormatter().format(_record("failed",
                                                              exc_info=sys.exc_info())))
    assert "ValueError" in line["exception"] and "123456789abc" not in line["exception"]


def test_an_unknown_format_is_refused():
    with pytest.raises(ConfigError, match="log_format"):
        logs.configure("info", "yaml")


async def _serve(middleware, headers=()):
    seen = {}

    async def app(scope, receive, send):
        seen["id"] = logs.request_id.get()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    await middleware(app)({"type": "http", "path": "/", "headers": list(headers)}, receive,
                          send)
    return seen["id"], dict(sent[0]["headers"])[b"x-request-id"].decode()


async def test_each_request_gets_an_id_in_the_log_context_and_the_response():
    inside, header = await _serve(logs.RequestIdMiddleware)
    assert inside == header and header.startswith("req_")
    assert logs.request_id.get() is None     # reset once the request is done
    inside, header = await _serve(logs.RequestIdMiddleware, [(b"x-request-id", b"abc-123")])
    assert inside == header == "abc-123"
    inside, header = await _serve(logs.RequestIdMiddleware, [(b"x-request-id", b"bad id\n")])
    assert header.startswith("req_")
