"""Tool settings: the `[tools]` table of the config file, then `PARLEY_TOOLS_*` variables.

    [tools]
    enabled = ["search", "booking", "payments"]   # built-in groups to offer
    search_dir = "/srv/support-articles"          # default: the bundled sample KB
    data_dir = "/var/lib/parley/tools"            # default: <cache_dir>/tools
    default_allow = ["*"]                         # tool-name patterns for keys not listed
    record_ttl_s = 604800                         # how long call records are kept
    execute_keys = ["sk-frontdesk"]               # chat and realtime run tools server-side
                                                  # for these keys ("*": all) unless a
                                                  # request or session says otherwise

    [tools.keys]                                  # API key -> tool-name patterns
    "sk-frontdesk" = ["search_knowledge_base", "check_availability", "*_booking*"]

    [tools.timeouts]                              # seconds, per tool
    search_knowledge_base = 3

    [tools.booking]      # see tools/booking_config.py
    [tools.payments]     # currencies, max_payment, session_daily_limit, key_daily_limit
    [[tools.webhooks]]   # see tools/webhook.py

The file is `PARLEY_TOOLS_CONFIG` if set, else the main config file (`PARLEY_CONFIG`).
Environment: PARLEY_TOOLS_ENABLED, PARLEY_TOOLS_SEARCH_DIR, PARLEY_TOOLS_DATA_DIR,
PARLEY_TOOLS_DEFAULT_ALLOW, PARLEY_TOOLS_EXECUTE_KEYS (comma-separated lists),
PARLEY_TOOLS_RECORD_TTL_S.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import ConfigError
from tools.booking_config import BookingConfig
from tools.payments import PaymentLimits
from tools.webhook import WebhookConfig

GROUPS = ("search", "booking", "payments")
# The sample customer-support articles shipped in the `tools` package.
BUNDLED_KB = Path(str(resources.files("tools").joinpath("data", "support_kb")))


@dataclass(frozen=True)
class ToolsConfig:
    data_dir: Path
    enabled: tuple[str, ...] = GROUPS
    search_dir: Path = BUNDLED_KB
    default_allow: tuple[str, ...] = ("*",)
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    timeouts: Mapping[str, float] = field(default_factory=dict)
    record_ttl_s: float = 7 * 24 * 3600
    booking: BookingConfig = field(default_factory=BookingConfig)
    payments: PaymentLimits = field(default_factory=PaymentLimits)
    webhooks: tuple[WebhookConfig, ...] = ()
    execute_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.enabled) - set(GROUPS)):
            raise ConfigError(f"tools.enabled: unknown group(s) {unknown}; known: {GROUPS}")


SIMPLE = {"enabled", "search_dir", "data_dir", "default_allow", "record_ttl_s",
          "execute_keys"}
TABLES = {"keys", "timeouts", "booking", "payments", "webhooks"}


def load_tools_config(settings: Settings, config_file: str | Path | None = None,
                      environ: Mapping[str, str] | None = None) -> ToolsConfig:
    environ = os.environ if environ is None else environ
    path = config_file or environ.get("PARLEY_TOOLS_CONFIG") or environ.get("PARLEY_CONFIG")
    table: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path:
        try:
            table = dict(tomllib.loads(Path(path).read_text()).get("tools", {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read tools config {path}: {exc}") from exc
        base_dir = Path(path).expanduser().resolve().parent
    if unknown := sorted(set(table) - SIMPLE - TABLES):
        raise ConfigError(f"unknown tools setting(s): {', '.join(unknown)}")
    for name in SIMPLE:
        env_name = f"PARLEY_TOOLS_{name.upper()}"
        if env_name in environ:
            table[name] = environ[env_name]
    return _build(table, settings, base_dir, environ)


def _build(table: dict[str, Any], settings: Settings, base_dir: Path,
           environ: Mapping[str, str]) -> ToolsConfig:
    values: dict[str, Any] = {"data_dir": Path(settings.cache_dir) / "tools"}
    try:
        for name in ("enabled", "default_allow", "execute_keys"):
            if name in table:
                values[name] = _names(table[name])
        for name in ("search_dir", "data_dir"):
            if name in table:
                values[name] = (base_dir / Path(str(table[name])).expanduser()).resolve()
        if "record_ttl_s" in table:
            values["record_ttl_s"] = float(table["record_ttl_s"])
        values["keys"] = {str(k): _names(v) for k, v in dict(table.get("keys", {})).items()}
        values["timeouts"] = {str(k): float(v)
                              for k, v in dict(table.get("timeouts", {})).items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tools: invalid setting: {exc}") from exc
    if any(t <= 0 for t in values["timeouts"].values()):
        raise ConfigError("tools.timeouts must be positive numbers of seconds")
    values["booking"] = BookingConfig.from_table(dict(table.get("booking", {})))
    values["payments"] = PaymentLimits.from_table(dict(table.get("payments", {})))
    values["webhooks"] = tuple(WebhookConfig.from_table(dict(hook), base_dir, environ)
                               for hook in table.get("webhooks", []))
    return ToolsConfig(**values)


def _names(raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return tuple(str(item).strip() for item in items if str(item).strip())
