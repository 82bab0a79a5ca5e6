"""Operator tools as HTTP endpoints: Parley POSTs the arguments, the JSON reply is the result.

Configured in `[[tools.webhooks]]`:

    [[tools.webhooks]]
    name = "order_status"
    description = "Look up an online order's status by its order number."
    url = "https://crm.example.com/parley/order-status"
    schema_file = "schemas/order_status.json"     # or: parameters = { type = "object", ... }
    auth_header = "Authorization: Bearer ${CRM_TOKEN}"   # ${VAR} comes from the environment
    timeout_s = 5
    side_effect = "read_only"      # read_only | idempotent_write | non_idempotent_write

Each request carries `Idempotency-Key: <call id>` (a retried delivery of the same call
has the same key) and `X-Parley-Session-Id`. A 2xx JSON object is returned to the model as
it is (any other JSON value as {"result": value}); a non-2xx status, a reply that is not
JSON, an unreachable endpoint or a timeout becomes an error result naming what happened.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx

from agent.dispatch.spec import ToolSpec
from agent.dispatch.types import CallContext, ErrorCode, SideEffect, ToolError
from agent.errors import ConfigError

MAX_RESPONSE_BYTES = 1024 * 1024
USER_AGENT = "parley-tools/0.1"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class WebhookConfig:
    name: str
    description: str
    url: str
    parameters: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    side_effect: SideEffect = SideEffect.IDEMPOTENT_WRITE

    @classmethod
    def from_table(cls, table: Mapping[str, Any], base_dir: Path,
                   environ: Mapping[str, str]) -> WebhookConfig:
        name = str(table.get("name", ""))
        known = {"name", "description", "url", "parameters", "schema_file", "auth_header",
                 "timeout_s", "side_effect"}
        if unknown := sorted(set(table) - known):
            raise ConfigError(f"webhook {name!r}: unknown setting(s) {', '.join(unknown)}")
        for required in ("name", "description", "url"):
            if not table.get(required):
                raise ConfigError(f"webhook {name!r}: {required} is required")
        url = str(table["url"])
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook {name!r}: url must be http(s)://, not {url!r}")
        try:
            effect = SideEffect(table.get("side_effect", SideEffect.IDEMPOTENT_WRITE))
            timeout_s = float(table.get("timeout_s", 10.0))
        except ValueError as exc:
            raise ConfigError(f"webhook {name!r}: {exc}") from exc
        headers = _auth_header(name, table.get("auth_header"), environ)
        return cls(name, str(table["description"]), url, _parameters(name, table, base_dir),
                   headers, timeout_s, effect)


def _parameters(name: str, table: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    if ("parameters" in table) == ("schema_file" in table):
        raise ConfigError(f"webhook {name!r}: give either parameters or schema_file")
    if "parameters" in table:
        return dict(table["parameters"])
    path = (base_dir / str(table["schema_file"])).expanduser()
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"webhook {name!r}: cannot read schema {path}: {exc}") from exc
    for key in ("$schema", "$id", "title"):
        schema.pop(key, None)
    return schema


def _auth_header(name: str, raw: Any, environ: Mapping[str, str]) -> dict[str, str]:
    if not raw:
        return {}
    header, sep, value = str(raw).partition(":")
    if not sep or not header.strip() or not value.strip():
        raise ConfigError(f"webhook {name!r}: auth_header must look like 'Name: value'")

    def expand(match: re.Match[str]) -> str:
        if match.group(1) not in environ:
            raise ConfigError(f"webhook {name!r}: auth_header needs ${{{match.group(1)}}}, "
                              "which is not set in the environment")
        return environ[match.group(1)]

    return {header.strip(): _VARIABLE.sub(expand, value.strip())}


class WebhookClient:
    """One HTTP connection pool for every webhook tool of a dispatcher."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=False,
                                         headers={"User-Agent": USER_AGENT})

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, hook: WebhookConfig, arguments: dict[str, Any],
                   context: CallContext) -> dict[str, Any]:
        headers = dict(hook.headers) | {"Idempotency-Key": context.call_id,
                                        "X-Parley-Session-Id": context.session_id,
                                        "X-Parley-Tool": hook.name}
        try:
            async with asyncio.timeout(hook.timeout_s):
                status, body = await self._post(hook, arguments, headers)
        except TimeoutError as exc:
            raise ToolError(f"the {hook.name} service did not answer within "
                            f"{hook.timeout_s:g} s", code=ErrorCode.TIMEOUT) from exc
        except httpx.HTTPError as exc:
            raise ToolError(f"the {hook.name} service could not be reached "
                            f"({type(exc).__name__})", code="unreachable") from exc
        return _reply(hook.name, status, body)

    async def _post(self, hook: WebhookConfig, arguments: dict[str, Any],
                    headers: dict[str, str]) -> tuple[int, bytes]:
        async with self._client.stream("POST", hook.url, json=arguments, headers=headers,
                                       timeout=hook.timeout_s) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise ToolError(f"the {hook.name} service sent more than "
                                    f"{MAX_RESPONSE_BYTES} bytes", code="bad_reply")
            return response.status_code, bytes(body)


def _reply(name: str, status: int, body: bytes) -> dict[str, Any]:
    if not 200 <= status < 300:
        details: dict[str, Any] = {"status": status}
        text = body[:500].decode("utf-8", errors="replace").strip()
        if text:
            details["body"] = text
        raise ToolError(f"the {name} service answered HTTP {status}", code="http_error",
                        details=details)
    if status == 204 or not body.strip():
        return {"status": "done"} if status == 204 else _not_json(name)
    try:
        value = json.loads(body)
    except ValueError:
        return _not_json(name)
    return value if isinstance(value, dict) else {"result": value}


def _not_json(name: str) -> NoReturn:
    raise ToolError(f"the {name} service's reply is not JSON", code="bad_reply")


def webhook_tools(hooks: tuple[WebhookConfig, ...], client: WebhookClient) -> list[ToolSpec]:
    specs = []
    for hook in hooks:
        async def handler(args: dict[str, Any], ctx: CallContext,
                          hook: WebhookConfig = hook) -> dict[str, Any]:
            return await client.call(hook, args, ctx)

        # The dispatcher's own timeout is a backstop; the client's names the service.
        specs.append(ToolSpec(hook.name, hook.description, hook.parameters, handler,
                              hook.side_effect, hook.timeout_s + 1.0))
    return specs
