"""What the model is offered of a tool's schema, and what is still validated."""

from __future__ import annotations

import pytest

from agent.dispatch.spec import NOT_FOR_MODEL, ToolSpec, load_tool_schema
from agent.errors import ConfigError


async def _noop(arguments, context):
    return {}


def test_idempotency_key_is_validated_but_not_offered_to_the_model():
    spec = ToolSpec("create_payment", "Take a payment.", load_tool_schema("create_payment"),
                    _noop)
    offered = spec.openai_tool()["function"]["parameters"]
    assert "idempotency_key" not in offered["properties"]
    assert "idempotency_key" not in spec.realtime_tool()["parameters"]["properties"]
    # A client or operator may still send one, and it is still checked.
    assert spec.validator.is_valid({"amount": 5, "currency": "EUR", "description": "x",
                                    "idempotency_key": "retry-1"})
    assert not spec.validator.is_valid({"amount": 5, "currency": "EUR", "description": "x",
                                        "idempotency_key": "has spaces"})


def test_a_required_field_cannot_be_hidden():
    schema = {"type": "object", "required": ["k"],
              "properties": {"k": {"type": "string", NOT_FOR_MODEL: True}}}
    with pytest.raises(ConfigError, match="cannot be hidden"):
        ToolSpec("t", "", schema, _noop)
