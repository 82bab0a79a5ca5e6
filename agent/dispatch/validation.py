"""Arguments checked again against the tool's schema, with errors that name the field.

The constrained decoder already makes arguments schema-valid, but calls also arrive from
clients and webhooks' schemas are the operator's: the dispatcher never trusts them.
The messages are written for the model to read and repair its call.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from agent.dispatch.types import ErrorCode, ToolError

MAX_ARGUMENT_BYTES = 64 * 1024


def parse_arguments(text: str, validator: jsonschema.protocols.Validator) -> dict[str, Any]:
    """The arguments as a dict, valid for `validator`, or ToolError(invalid_arguments)."""
    if len(text.encode()) > MAX_ARGUMENT_BYTES:
        raise _invalid(f"the arguments are longer than {MAX_ARGUMENT_BYTES} bytes", None)
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"the arguments are not valid JSON ({exc})", None) from exc
    if not isinstance(value, dict):
        raise _invalid("the arguments must be a JSON object", None)
    error = best_match(validator.iter_errors(value))
    if error is not None:
        raise _describe(error)
    return value


def make_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def field_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: ValidationError) -> ToolError:
    # anyOf/oneOf: the innermost error at the same place is the one the model can act on.
    while error.context:
        deeper = best_match(error.context)
        if deeper is None:
            break
        error = deeper
    where = field_path(error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        name = missing[0] if missing else "?"
        full = f"{where}.{name}" if where else name
        return _invalid(f"missing required field '{full}'", full)
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = sorted(key for key in error.instance if key not in known)
        name = extra[0] if extra else "?"
        full = f"{where}.{name}" if where else name
        return _invalid(f"unknown field '{full}'", full)
    message = error.message if len(error.message) <= 200 else error.message[:199] + "…"
    if not where:
        return _invalid(message, None)
    return _invalid(f"field '{where}': {message}", where)


def _invalid(message: str, field: str | None) -> ToolError:
    details = {"field": field} if field else {}
    return ToolError(f"invalid arguments: {message}", code=ErrorCode.INVALID_ARGUMENTS,
                     details=details)
