"""Operator webhooks against a real HTTP server on 127.0.0.1, directly and dispatched."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from agent.config import load_settings
from agent.dispatch import CallContext, ToolCall
from agent.dispatch.catalog import open_dispatcher
from agent.dispatch.config import load_tools_config
from agent.dispatch.types import ToolError
from tests.tool_fixtures import MODULE_LOOP, call_id, store  # noqa: F401
from tools.webhook import WebhookClient, WebhookConfig

pytestmark = MODULE_LOOP

SCHEMA = {"type": "object", "properties": {"order": {"type": "string"}},
          "required": ["order"], "additionalProperties": False}


class Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Handler.seen.append({"path": self.path, "headers": dict(self.headers),
                             "body": json.loads(body)})
        if self.path == "/slow":
            time.sleep(1.5)
        replies = {
            "/ok": (200, json.dumps({"order": json.loads(body).get("order"),
                                     "status": "shipped"}).encode()),
            "/slow": (200, b'{"late": true}'),
            "/fail": (500, b"database unavailable"),
            "/badjson": (200, b"<html>not json</html>"),
            "/list": (200, b'["a", "b"]'),
            "/empty": (204, b""),
            "/auth": (200 if self.headers.get("Authorization") == "Bearer s3cret" else 401,
                      b'{"authorised": true}'),
        }
        status, payload = replies.get(self.path, (404, b"no such hook"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _hook(server: str, path: str, timeout_s: float = 5.0, **extra) -> WebhookConfig:
    return WebhookConfig("order_status", "Order status.", f"{server}{path}", SCHEMA,
                         timeout_s=timeout_s, **extra)


async def _call(server: str, path: str, **extra) -> dict:
    client = WebhookClient()
    try:
        return await client.call(_hook(server, path, **extra), {"order": "HK1001"},
                                 CallContext("sess_w", call_id="call_w1"))
    finally:
        await client.aclose()


async def _error(server: str, path: str, **extra) -> ToolError:
    with pytest.raises(ToolError) as caught:
        await _call(server, path, **extra)
    return caught.value


async def test_the_arguments_are_posted_and_the_json_reply_returned(server):
    assert await _call(server, "/ok") == {"order": "HK1001", "status": "shipped"}
    request = Handler.seen[-1]
    assert request["body"] == {"order": "HK1001"}
    assert request["headers"]["Idempotency-Key"] == "call_w1"
    assert request["headers"]["X-Parley-Session-Id"] == "sess_w"
    assert request["headers"]["Content-Type"] == "application/json"


async def test_the_auth_header_is_sent(server):
    assert await _call(server, "/auth", headers={"Authorization": "Bearer s3cret"}) == \
        {"authorised": True}
    assert (await _error(server, "/auth")).details["status"] == 401


async def test_a_slow_endpoint_times_out(server):
    started = time.monotonic()
    error = await _error(server, "/slow", timeout_s=0.3)
    assert error.code == "timeout" and "0.3 s" in error.message
    assert time.monotonic() - started < 1.4


async def test_a_server_error_names_the_status_and_shows_the_body(server):
    error = await _error(server, "/fail")
    assert error.code == "http_error" and "HTTP 500" in error.message
    assert error.details == {"status": 500, "body": "database unavailable"}


async def test_a_reply_that_is_not_json_is_an_error(server):
    assert (await _error(server, "/badjson")).code == "bad_reply"


async def test_other_replies(server):
    assert await _call(server, "/list") == {"result": ["a", "b"]}
    assert await _call(server, "/empty") == {"status": "done"}
    assert (await _error(server, "/missing")).details["status"] == 404


async def test_an_unreachable_endpoint_is_an_error():
    assert (await _error("http://127.0.0.1:9", "/x")).code == "unreachable"


async def test_configured_webhooks_are_dispatched_like_any_tool(
        server, store, tmp_path):  # noqa: F811
    config_file = tmp_path / "parley.toml"
    config_file.write_text(f"""
[tools]
enabled = []
[[tools.webhooks]]
name = "order_status"
description = "Look up an order."
url = "{server}/ok"
parameters = {{ type = "object", properties = {{ order = {{ type = "string" }} }}, \
required = ["order"] }}
side_effect = "read_only"
[[tools.webhooks]]
name = "loyalty_points"
description = "Look up loyalty points."
url = "{server}/fail"
parameters = {{ type = "object", properties = {{}} }}
[[tools.webhooks]]
name = "slow_crm"
description = "A slow CRM."
url = "{server}/slow"
timeout_s = 0.3
parameters = {{ type = "object", properties = {{}} }}
""")
    settings = load_settings(environ={}, cache_dir=str(tmp_path))
    config = load_tools_config(settings, config_file=config_file, environ={})
    dispatcher = await open_dispatcher(settings, store, config)
    context = CallContext("sess_hooks", "sk-any")
    try:
        assert [t["function"]["name"] for t in dispatcher.openai_tools(context)] == \
            ["order_status", "loyalty_points", "slow_crm"]
        ok = await dispatcher.execute(ToolCall(call_id(), "order_status",
                                               '{"order": "HK7"}'), context)
        assert ok.ok and ok.output == {"order": "HK7", "status": "shipped"}
        bad = await dispatcher.execute(ToolCall(call_id(), "order_status", '{"order": 7}'),
                                       context)
        assert bad.code == "invalid_arguments" and "'order'" in bad.error
        failed = await dispatcher.execute(ToolCall(call_id(), "loyalty_points", "{}"), context)
        assert not failed.ok and failed.code == "http_error"
        assert failed.output["error"]["status"] == 500
        slow = await dispatcher.execute(ToolCall(call_id(), "slow_crm", "{}"), context)
        assert slow.code == "timeout"
    finally:
        await dispatcher.aclose()
