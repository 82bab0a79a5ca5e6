"""The tools a dispatcher can run, by name, in the order they were registered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.dispatch.spec import ToolSpec
from agent.errors import ConfigError


class ToolRegistry:
    def __init__(self, specs: Iterable[ToolSpec] = ()):
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ToolSpec) -> None:
        if spec.name in self._specs:
            raise ConfigError(f"two tools are named {spec.name!r}")
        self._specs[spec.name] = spec

    def get(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def specs(self, names: Iterable[str] | None = None) -> list[ToolSpec]:
        """Every spec, or those named (in registration order), skipping unknown names."""
        if names is None:
            return list(self._specs.values())
        wanted = set(names)
        return [spec for name, spec in self._specs.items() if name in wanted]

    def openai_tools(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [spec.openai_tool() for spec in self.specs(names)]
