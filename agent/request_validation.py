"""Request bodies checked against the JSON Schemas in `schemas/`, errors naming the parameter.

The schemas are the single source of truth for the protocol shapes (agent/json_schema.py
loads them and finds the failing field); this module words the finding as OpenAI's 400s
(`param` is the JSON path the client sent, such as `messages[0].content[1].input_audio
.format`).
"""

from __future__ import annotations

from typing import Any

from agent.errors import InvalidRequestError
from agent.json_schema import Problem, first_problem, named_validator, schema


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
    problem = first_problem(named_validator(name).iter_errors(body), stop_at_alternatives=True)
    if problem is not None:
        raise _to_request_error(problem)


def _to_request_error(problem: Problem) -> InvalidRequestError:
    error, param, full = problem.error, problem.path, problem.field
    where = f"'{param}'" if param else "the request body"
    if problem.kind == "required":
        return InvalidRequestError(f"Missing required parameter: '{full}'.", param=full,
                                   code="missing_required_parameter")
    if problem.kind == "unknown":
        return InvalidRequestError(f"Unknown parameter: '{full}'.", param=full,
                                   code="unknown_parameter")
    if problem.kind == "type":
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
