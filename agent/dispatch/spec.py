"""A tool as the dispatcher knows it: a frozen spec naming its schema, limits and handler.

The argument schema of a built-in tool lives in `schemas/tools/<name>.json` (OpenAI's
function `parameters` shape); that file is what the model is offered and what the
arguments are validated against, so the two can never drift apart. A property marked
`"x-parley-not-for-model": true` (an idempotency key, say) is left out of what the model
is offered — it is for API clients and operators; the model only fills it in badly — and
must be optional, so anything valid for the model's view is valid for the whole schema.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jsonschema

from agent.dispatch.types import CallContext, SideEffect
from agent.errors import ConfigError
from agent.json_schema import make_validator, validator_class

NOT_FOR_MODEL = "x-parley-not-for-model"
# OpenAI's rule for function names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Handler = Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
# Says in words (and data) what a non-idempotent call would do, for the confirmation step.
Preview = Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler = field(compare=False, repr=False)
    side_effect: SideEffect = SideEffect.READ_ONLY
    timeout_s: float = 10.0
    preview: Preview | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(f"tool name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.parameters.get("type") != "object":
            raise ConfigError(f"tool {self.name!r}: parameters must be an object schema")
        try:
            validator_class(self.parameters)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"tool {self.name!r}: invalid schema: {exc.message}") from exc
        if not self.timeout_s > 0:
            raise ConfigError(f"tool {self.name!r}: timeout must be positive")
        if hidden := sorted(set(_hidden(self.parameters)) & set(self.parameters.get("required",
                                                                                  []))):
            raise ConfigError(f"tool {self.name!r}: {hidden} are required, so they cannot be "
                              f"hidden from the model ({NOT_FOR_MODEL})")

    @functools.cached_property
    def validator(self) -> jsonschema.protocols.Validator:
        return make_validator(self.parameters)

    def model_parameters(self) -> dict[str, Any]:
        """The parameters schema as the model is offered it."""
        schema = copy.deepcopy(self.parameters)
        for name in _hidden(schema):
            del schema["properties"][name]
        return schema

    def openai_tool(self) -> dict[str, Any]:
        """The entry for a Chat Completions `tools` list."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": self.model_parameters()}}

    def realtime_tool(self) -> dict[str, Any]:
        """The entry for a Realtime `session.tools` list (flat, no `function` wrapper)."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.model_parameters()}


def _hidden(schema: dict[str, Any]) -> list[str]:
    return [name for name, prop in (schema.get("properties") or {}).items()
            if isinstance(prop, dict) and prop.get(NOT_FOR_MODEL)]


@functools.cache
def _schema_text(name: str) -> str:
    path = resources.files("schemas").joinpath("tools", f"{name}.json")
    try:
        return path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"no schema file schemas/tools/{name}.json") from exc


def load_tool_schema(name: str) -> dict[str, Any]:
    """The parameters schema of a built-in tool (a fresh copy each time)."""
    schema = json.loads(_schema_text(name))
    # `$schema`/`$id`/`title` are for the repository, not for the model's prompt.
    for key in ("$schema", "$id", "title"):
        schema.pop(key, None)
    return schema
