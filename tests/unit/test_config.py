from pathlib import Path

import pytest

from agent.config import OPENAI_VOICES, load_settings
from agent.errors import ConfigError


def test_defaults_without_file_or_environment():
    s = load_settings(environ={})
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.asr_language == "en" and s.redis_url == ""
    assert s.voice_map()["alloy"] == "joe"
    assert set(OPENAI_VOICES) <= set(s.voice_map())


def test_toml_tables_prefix_keys_and_environment_wins(tmp_path: Path):
    cfg = tmp_path / "parley.toml"
    cfg.write_text(
        'port = 9000\napi_keys = ["a", "b"]\n'
        '[asr]\nlanguage = "de"\n'
        '[voices]\nnova = "/voices/amy.onnx"\n'
    )
    s = load_settings(cfg, environ={"PARLEY_PORT": "9100", "PARLEY_AUTH_DISABLED": "yes"})
    assert s.port == 9100
    assert s.api_keys == ("a", "b")
    assert s.asr_language == "de"
    assert s.auth_disabled is True
    assert s.voice_map()["nova"] == "/voices/amy.onnx"
    assert s.voice_map()["alloy"] == "joe"


def test_environment_lists_and_maps():
    s = load_settings(environ={
        "PARLEY_API_KEYS": "k1, k2,",
        "PARLEY_VOICES": "echo=/v/echo.onnx,onyx=joe",
        "REDIS_URL": "redis://localhost:6390/0",
        "PARLEY_MAX_AUDIO_SECONDS": "30.5",
    })
    assert s.api_keys == ("k1", "k2")
    assert s.voice_map()["echo"] == "/v/echo.onnx"
    assert s.redis_url == "redis://localhost:6390/0"
    assert s.max_audio_seconds == 30.5


def test_config_file_from_environment_variable(tmp_path: Path):
    cfg = tmp_path / "p.toml"
    cfg.write_text("host = '0.0.0.0'\n")
    assert load_settings(environ={"PARLEY_CONFIG": str(cfg)}).host == "0.0.0.0"


@pytest.mark.parametrize("environ", [
    {"PARLEY_PORT": "eighty"},
    {"PARLEY_AUTH_DISABLED": "maybe"},
    {"PARLEY_VAD_THRESHOLD": "high"},
])
def test_malformed_values_name_the_setting(environ):
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert next(iter(environ))[len("PARLEY_"):].lower() in info.value.message


def test_unknown_or_broken_file_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings(bad, environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(broken, environ={})
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "missing.toml", environ={})
