"""Which tools an API key, and then a session, may use.

Configuration maps API keys to lists of tool-name patterns (shell-style: `*_booking`);
keys not listed get `default_allow`. A session may narrow that further with its own list
(CallContext.allowed_tools) but never widen it. Denials are logged with the key's
fingerprint, never the key.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.dispatch.types import CallContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolPermissions:
    default_allow: tuple[str, ...] = ("*",)
    by_key: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def patterns_for(self, api_key: str | None) -> tuple[str, ...]:
        if api_key is not None and api_key in self.by_key:
            return self.by_key[api_key]
        return self.default_allow

    def allows(self, context: CallContext, tool: str) -> bool:
        if context.allowed_tools is not None and tool not in context.allowed_tools:
            return False
        return any(fnmatch.fnmatchcase(tool, p) for p in self.patterns_for(context.api_key))

    def allowed(self, context: CallContext, tools: Iterable[str]) -> list[str]:
        return [name for name in tools if self.allows(context, name)]

    def why_denied(self, context: CallContext, tool: str) -> str:
        if context.allowed_tools is not None and tool not in context.allowed_tools:
            return "not enabled for this session"
        return "not allowed for this API key"

    def log_denial(self, context: CallContext, tool: str, call_id: str) -> None:
        log.warning("tool call denied: tool=%s call_id=%s session=%s key=%s reason=%s",
                    tool, call_id, context.session_id, context.key_id,
                    self.why_denied(context, tool))
