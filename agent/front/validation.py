"""Request bodies checked against the JSON Schemas in `schemas/`, errors naming the parameter.

The schemas are the single source of truth for the protocol shapes; this module only turns
jsonschema's findings into OpenAI's 400s (`param` is the JSON path the client sent, such as
`messages[0].content[1].input_audio.format`).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from agent.errors import InvalidRequestError


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """Load `schemas/<name>.json` (e.g. "openai/chat_completion_request")."""
    text = resources.files("schemas").joinpath(f"{name}.json").read_text()
    return json.loads(text)


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    spec = schema(name)
    cls = jsonschema.validators.validator_for(spec)
    cls.check_schema(spec)
    return cls(spec, format_checker=cls.FORMAT_CHECKER)


def param_path(path: Any) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validate(name: str, body: Any) -> None:
    """Raise InvalidRequestError for the most relevant problem of `body`, or return."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.",
                                  code="invalid_request_body")
    spec = schema(name)
    unsupported = spec.get("x-parley-unsupported", [])
    known = spec.get("properties", {})
    for key in body:
        if key in unsupported:
            raise InvalidRequestError(
                f"Unsupported parameter: '{key}' is not supported by Parley.",
                param=key, code="unsupported_parameter")
        if spec.get("additionalProperties") is False and key not in known:
            raise InvalidRequestError(f"Unknown parameter: '{key}'.", param=key,
                                      code="unknown_parameter")
    error = best_match(_validator(name).iter_errors(body))
    if error is not None:
        raise _to_request_error(error)


def _to_request_error(error: ValidationError) -> InvalidRequestError:
    # For oneOf/anyOf failures, the innermost error is the one a person can act on.
    while error.context:
        deeper = best_match(error.context)
        if deeper is None or (list(deeper.absolute_path) == list(error.absolute_path) \
                and deeper.validator in ("type", "oneOf", "anyOf")):
            break
        error = deeper
    param = param_path(error.absolute_path)
    where = f"'{param}'" if param else "the request body"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        full = f"{param}.{missing}" if param else missing
        return InvalidRequestError(f"Missing required parameter: '{full}'.", param=full,
                                   code="missing_required_parameter")
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        full = f"{param}.{extra[0]}" if param and extra else (extra[0] if extra else param)
        return InvalidRequestError(f"Unknown parameter: '{full}'.", param=full,
                                   code="unknown_parameter")
    if error.validator == "type":
        return InvalidRequestError(
            f"Invalid type for {where}: expected {_types(error.validator_value)}, "
            f"but got {_json_type(error.instance)}.", param=param, code="invalid_type")
    return InvalidRequestError(f"Invalid value for {where}: {_short(error.message)}",
                               param=param, code="invalid_value")


def _types(value: Any) -> str:
    names = value if isinstance(value, list) else [value]
    return " or ".join(("an " if n in ("object", "array", "integer") else "a ") + n
                       for n in names if n != "null")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"
