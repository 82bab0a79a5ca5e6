"""`parley serve` as a user starts it: a real process, real HTTP."""

import os
import subprocess

import httpx
import pytest

from tests.server_process import PARLEY, serve


@pytest.fixture(scope="module")
def server():
    # The default decoder backend, as a user runs it. A server stopped while it builds the
    # CPU extension leaves nothing that blocks the next build: the build flock dies with it.
    with serve({"PARLEY_API_KEYS": "sk-integration"}) as base:
        yield base


def test_healthz_reports_store_and_models(server):
    body = httpx.get(server + "/healthz").json()
    assert body["status"] == "ok"
    assert body["store"] == {"ok": True, "embedded": True}
    assert {"whisper-base", "joe", "silero-vad", "smollm2"} <= set(body["models"])


def test_unknown_route_is_an_openai_error(server):
    r = httpx.get(server + "/v1/nothing-here", headers={"Authorization": "Bearer sk-integration"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"


def test_every_api_route_needs_the_key(server):
    for path in ("/v1/models", "/v1/nothing-here"):
        r = httpx.get(server + path)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/healthz").status_code == 200


def test_a_key_is_made_when_none_is_configured(tmp_path):
    from agent.api_keys import with_api_keys
    from agent.config import load_settings

    first = with_api_keys(load_settings(environ={}, cache_dir=str(tmp_path)))
    again = with_api_keys(load_settings(environ={}, cache_dir=str(tmp_path)))
    assert first.api_keys == again.api_keys and first.api_keys[0].startswith("sk-parley-")
    assert (tmp_path / "api_key").stat().st_mode & 0o777 == 0o600
    open_server = with_api_keys(load_settings(environ={"PARLEY_AUTH_DISABLED": "1"},
                                              cache_dir=str(tmp_path / "other")))
    assert open_server.api_keys == ()


def test_serve_refuses_to_start_without_a_model(tmp_path):
    env = dict(os.environ, PARLEY_LLM_MODEL=str(tmp_path / "absent.gguf"))
    out = subprocess.run([str(PARLEY), "serve", "--port", "1"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "absent.gguf" in out.stdout + out.stderr


def test_models_command_lists_every_model():
    out = subprocess.run([str(PARLEY), "models"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("whisper-base", "joe", "silero-vad", "smollm2", "qwen2.5-coder-0.5b"):
        assert name in out.stdout
