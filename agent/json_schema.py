"""The JSON Schemas in `schemas/`, and what a validation error is about, in one place.

Three layers check JSON against a schema: HTTP request bodies (request_validation.py),
realtime client events (realtime/protocol.py) and tool-call arguments
(dispatch/validation.py). They load schemas, build validators and find the failing field
here; each words the finding for its own reader (an OpenAI 400, an `error` event, a
message the model repairs its call from).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """`schemas/<name>.json` (e.g. "openai/chat_completion_request"), loaded once."""
    text = resources.files("schemas").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def validator_class(spec: dict[str, Any]) -> type[jsonschema.protocols.Validator]:
    """The validator class `spec`'s dialect names, after checking `spec` is a valid schema
    (jsonschema.SchemaError otherwise)."""
    cls = jsonschema.validators.validator_for(spec)
    cls.check_schema(spec)
    return cls


def make_validator(spec: dict[str, Any], **options: Any) -> jsonschema.protocols.Validator:
    """A validator for `spec` that also checks `format`s."""
    cls = validator_class(spec)
    return cls(spec, format_checker=cls.FORMAT_CHECKER, **options)


@functools.cache
def named_validator(name: str) -> jsonschema.protocols.Validator:
    return make_validator(schema(name))


def json_path(path: Iterable[Any]) -> str | None:
    """`messages[0].content[1].format` for the path parts ("messages", 0, ...)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


@dataclass(frozen=True)
class Problem:
    """The validation error a person (or a model) can act on, and where it is.

    kind: "required" (a field is missing), "unknown" (a field the schema does not have),
    or the failing keyword otherwise ("type", "enum", "minimum", ...). `path` is where the
    failing value sits; `field` is the field to name: the missing or unknown one, else
    `path`.
    """

    kind: str
    path: str | None
    field: str | None
    error: ValidationError


def first_problem(errors: Iterable[ValidationError], *,
                  stop_at_alternatives: bool = False) -> Problem | None:
    """The most relevant of `errors`, or None when there are none.

    For anyOf/oneOf failures the innermost error is the one to act on; with
    `stop_at_alternatives` the descent stops where the deeper error is only another
    type or alternatives mismatch at the same place (a value of the wrong type for every
    branch is reported as that, not as one branch's complaint).
    """
    error = best_match(errors)
    if error is None:
        return None
    while error.context:
        deeper = best_match(error.context)
        if deeper is None or (stop_at_alternatives
                              and list(deeper.absolute_path) == list(error.absolute_path)
                              and deeper.validator in ("type", "oneOf", "anyOf")):
            break
        error = deeper
    path = json_path(error.absolute_path)
    kind, name = str(error.validator), None
    if kind == "required":
        name = next((k for k in error.validator_value if k not in error.instance), "?")
    elif kind == "additionalProperties":
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = sorted(k for k in error.instance if k not in known)
        kind, name = "unknown", extra[0] if extra else "?"
    field = (f"{path}.{name}" if path else name) if name is not None else path
    return Problem(kind, path, field, error)
