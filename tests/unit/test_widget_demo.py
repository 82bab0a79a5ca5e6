"""Who may mint the widget demo's client secrets (agent.front.widget)."""

from types import SimpleNamespace

import pytest
from starlette.requests import Request

from agent.config import load_settings
from agent.errors import ConfigError
from agent.front.widget import check_demo_mode, demo_secrets_allowed


def _request(mode: str, *, server=("127.0.0.1", 8000), client=("127.0.0.1", 50000),
             headers=()) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(settings=load_settings(widget_demo=mode)))
    return Request({"type": "http", "method": "POST", "path": "/widget/client-secret",
                    "headers": [(k.encode(), v.encode()) for k, v in headers],
                    "server": server, "client": client, "app": app})


def test_auto_allows_a_loopback_connection():
    assert demo_secrets_allowed(_request("auto"))
    assert demo_secrets_allowed(_request("auto", server=("::1", 8000), client=("::1", 1)))


@pytest.mark.parametrize("where", [
    {"server": ("0.0.0.0", 8000)},          # listening on every interface
    {"server": ("10.0.0.5", 8000)},
    {"client": ("192.168.1.20", 50000)},    # a visitor from the network
    {"headers": [("x-forwarded-for", "203.0.113.9")]},   # a proxy on the same host
    {"headers": [("forwarded", "for=203.0.113.9")]},
    {"headers": [("x-real-ip", "203.0.113.9")]},
    {"client": None},
])
def test_auto_refuses_anything_else(where):
    assert not demo_secrets_allowed(_request("auto", **where))


def test_on_and_off_override_the_address():
    assert demo_secrets_allowed(_request("on", server=("10.0.0.5", 80), client=("10.0.0.9", 1)))
    assert not demo_secrets_allowed(_request("off"))


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="widget_demo"):
        check_demo_mode(load_settings(widget_demo="maybe"))
    check_demo_mode(load_settings())
