"""Tool settings from the `[tools]` table and PARLEY_TOOLS_* variables."""

import json
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.dispatch.config import BUNDLED_KB, load_tools_config
from agent.dispatch.types import SideEffect
from agent.errors import ConfigError
from tools.currencies import CURRENCIES

SETTINGS = load_settings(environ={}, cache_dir="/tmp/parley-cache")


def test_defaults_use_the_bundled_kb_and_the_cache_folder():
    config = load_tools_config(SETTINGS, environ={})
    assert config.enabled == ("search", "booking", "payments")
    assert config.search_dir == BUNDLED_KB and any(BUNDLED_KB.glob("*.md"))
    assert config.data_dir == Path("/tmp/parley-cache/tools")
    assert config.default_allow == ("*",) and config.webhooks == ()


def test_a_full_tools_table(tmp_path):
    (tmp_path / "order.json").write_text(json.dumps(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
         "properties": {"order": {"type": "string"}}, "required": ["order"]}))
    path = tmp_path / "parley.toml"
    path.write_text("""
[tools]
enabled = ["search", "booking"]
search_dir = "kb"
default_allow = ["search_*"]
[tools.keys]
"sk-desk" = ["*_booking", "check_availability"]
[tools.timeouts]
create_booking = 2.5
[tools.booking]
timezone = "Europe/Berlin"
tables = { A = 2, B = 10 }
hours = { mon = "18:00-23:00", tue = "closed" }
[tools.payments]
currencies = ["eur"]
max_payment = { EUR = 200 }
[[tools.webhooks]]
name = "order_status"
description = "Order status by number."
url = "http://127.0.0.1:9/status"
schema_file = "order.json"
auth_header = "Authorization: Bearer ${CRM_TOKEN}"
timeout_s = 3
side_effect = "read_only"
""")
    config = load_tools_config(SETTINGS, environ={"PARLEY_TOOLS_CONFIG": str(path),
                                                  "CRM_TOKEN": "t0k"})
    assert config.enabled == ("search", "booking")
    assert config.search_dir == tmp_path / "kb"
    assert config.keys == {"sk-desk": ("*_booking", "check_availability")}
    assert config.timeouts == {"create_booking": 2.5}
    assert config.booking.timezone == "Europe/Berlin" and config.booking.max_party == 10
    assert config.booking.hours["mon"] == ((18 * 60, 23 * 60),)
    assert config.booking.hours["tue"] == ()
    assert config.payments.currencies == frozenset({"EUR"})
    assert config.payments.per_payment(CURRENCIES["EUR"]) == 20_000
    hook = config.webhooks[0]
    assert hook.headers == {"Authorization": "Bearer t0k"}
    assert hook.parameters["required"] == ["order"] and "$schema" not in hook.parameters
    assert hook.side_effect is SideEffect.READ_ONLY and hook.timeout_s == 3


def test_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "parley.toml"
    path.write_text('[tools]\nenabled = ["search"]\n')
    config = load_tools_config(SETTINGS, environ={
        "PARLEY_CONFIG": str(path), "PARLEY_TOOLS_ENABLED": "booking,payments",
        "PARLEY_TOOLS_DEFAULT_ALLOW": "search_knowledge_base, get_payment",
        "PARLEY_TOOLS_DATA_DIR": str(tmp_path / "data")})
    assert config.enabled == ("booking", "payments")
    assert config.default_allow == ("search_knowledge_base", "get_payment")
    assert config.data_dir == tmp_path / "data"


@pytest.mark.parametrize(("toml", "message"), [
    ('[tools]\nenabeld = ["search"]', "unknown tools setting"),
    ('[tools]\nenabled = ["search", "crm"]', "unknown group"),
    ('[tools.booking]\nhours = { mon = "23:00-18:00" }', "closes before it opens"),
    ('[tools.booking]\ntimezone = "Mars/Olympus"', "unknown timezone"),
    ('[tools.booking]\nduration_minutes = 100', "multiple of"),
    ('[tools.payments]\ncurrencies = ["XXX"]', "unsupported currencies"),
    ('[tools.timeouts]\nsearch_knowledge_base = 0', "positive"),
    ('[[tools.webhooks]]\nname = "x"\ndescription = "d"\nurl = "ftp://h"\nparameters = {}',
     "http"),
    ('[[tools.webhooks]]\nname = "x"\ndescription = "d"\nurl = "http://h"', "parameters"),
    ('[[tools.webhooks]]\nname = "x"\ndescription = "d"\nurl = "http://h"\n'
     'parameters = {type = "object"}\nauth_header = "Bearer ${NOT_SET_ANYWHERE}"', "Name: value"),
    ('[[tools.webhooks]]\nname = "x"\ndescription = "d"\nurl = "http://h"\n'
     'parameters = {type = "object"}\nauth_header = "X-Key: ${NOT_SET_ANYWHERE}"',
     "NOT_SET_ANYWHERE"),
])
def test_mistakes_are_config_errors_that_say_what_is_wrong(tmp_path, toml, message):
    path = tmp_path / "parley.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_tools_config(SETTINGS, config_file=path, environ={})
