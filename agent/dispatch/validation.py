"""Arguments checked again against the tool's schema, with errors that name the field.

The constrained decoder already makes arguments schema-valid, but calls also arrive from
clients and webhooks' schemas are the operator's: the dispatcher never trusts them.
The messages are written for the model to read and repair its call.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from agent.dispatch.types import ErrorCode, ToolError
from agent.json_schema import Problem, first_problem

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
    problem = first_problem(validator.iter_errors(value))
    if problem is not None:
        raise _describe(problem)
    return value


def _describe(problem: Problem) -> ToolError:
    error, where, full = problem.error, problem.path, problem.field
    if problem.kind == "required":
        return _invalid(f"missing required field '{full}'", full)
    if problem.kind == "unknown":
        return _invalid(f"unknown field '{full}'", full)
    message = error.message if len(error.message) <= 200 else error.message[:199] + "…"
    if not where:
        return _invalid(message, None)
    return _invalid(f"field '{where}': {message}", where)


def _invalid(message: str, field: str | None) -> ToolError:
    details = {"field": field} if field else {}
    return ToolError(f"invalid arguments: {message}", code=ErrorCode.INVALID_ARGUMENTS,
                     details=details)
