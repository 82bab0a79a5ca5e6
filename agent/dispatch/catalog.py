"""The dispatcher a server runs: built-in backends and operator webhooks, from config.

Opening creates the SQLite files under `data_dir` and indexes the document folder, so
it runs off the event loop; call it once at start-up and `aclose()` the dispatcher at
shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses

from agent.api_keys import tool_patterns
from agent.config import Settings
from agent.dispatch.config import ToolsConfig, load_tools_config
from agent.dispatch.dispatcher import Dispatcher
from agent.dispatch.permissions import ToolPermissions
from agent.dispatch.registry import ToolRegistry
from agent.dispatch.spec import ToolSpec
from agent.errors import ConfigError
from agent.state.store import Store
from tools.booking import BookingBook, booking_tools
from tools.payments import Payments, payment_tools
from tools.search import SearchIndex, search_tools
from tools.webhook import WebhookClient, webhook_tools


def builtin_specs(config: ToolsConfig) -> list[ToolSpec]:
    """Specs of the enabled built-in groups (blocking: opens SQLite, builds the index)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    specs: list[ToolSpec] = []
    if "search" in config.enabled:
        if not config.search_dir.is_dir():
            raise ConfigError(f"tools.search_dir {config.search_dir} is not a folder")
        index = SearchIndex(config.search_dir, config.data_dir / "search.sqlite3")
        index.refresh(force=True)
        specs += search_tools(index)
    if "booking" in config.enabled:
        specs += booking_tools(BookingBook(config.data_dir / "booking.sqlite3",
                                           config.booking))
    if "payments" in config.enabled:
        specs += payment_tools(Payments(config.data_dir / "payments.sqlite3",
                                        limits=config.payments))
    return specs


async def open_dispatcher(settings: Settings, store: Store,
                          config: ToolsConfig | None = None) -> Dispatcher:
    config = config or load_tools_config(settings)
    specs = await asyncio.to_thread(builtin_specs, config)
    closers = []
    if config.webhooks:
        client = WebhookClient()
        specs += webhook_tools(config.webhooks, client)
        closers.append(client.aclose)
    registry = ToolRegistry(_with_timeouts(specs, config))
    return Dispatcher(registry, store,
                      ToolPermissions(config.default_allow,
                                      {**dict(config.keys), **tool_patterns(settings)}),
                      record_ttl_s=config.record_ttl_s, closers=tuple(closers))


def _with_timeouts(specs: list[ToolSpec], config: ToolsConfig) -> list[ToolSpec]:
    names = {spec.name for spec in specs}
    if unknown := sorted(set(config.timeouts) - names):
        raise ConfigError(f"tools.timeouts names unknown tool(s): {unknown}")
    return [dataclasses.replace(spec, timeout_s=config.timeouts[spec.name])
            if spec.name in config.timeouts else spec for spec in specs]
