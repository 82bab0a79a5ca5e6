"""Arguments are checked again against the tool's schema; errors name the field."""

import json
from importlib import resources

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dispatch import SideEffect, ToolError, ToolSpec, load_tool_schema
from agent.dispatch.validation import parse_arguments
from agent.errors import ConfigError
from agent.json_schema import make_validator

BOOKING = make_validator(load_tool_schema("create_booking"))
NESTED = make_validator({
    "type": "object", "required": ["order"], "additionalProperties": False,
    "properties": {"order": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": {"type": "object", "required": ["sku"],
                                             "properties": {"sku": {"type": "string"},
                                                            "qty": {"type": "integer",
                                                                    "minimum": 1}}}},
        "speed": {"enum": ["standard", "express"]}}}}})
GOOD = {"date": "2031-03-04", "time": "19:00", "party_size": 2, "name": "Ann",
        "phone": "+44 7700 900123"}


def _error(text: str, validator=BOOKING) -> ToolError:
    with pytest.raises(ToolError) as caught:
        parse_arguments(text, validator)
    assert caught.value.code == "invalid_arguments"
    return caught.value


def test_valid_arguments_come_back_as_a_dict():
    assert parse_arguments(json.dumps(GOOD), BOOKING) == GOOD


@pytest.mark.parametrize(("arguments", "field"), [
    ({k: v for k, v in GOOD.items() if k != "phone"}, "phone"),
    (GOOD | {"party_size": 0}, "party_size"),
    (GOOD | {"party_size": "2"}, "party_size"),
    (GOOD | {"time": "7pm"}, "time"),
    (GOOD | {"date": "2031-02-30"}, "date"),
    (GOOD | {"table": "T1"}, "table"),
])
def test_the_error_names_the_bad_field(arguments, field):
    error = _error(json.dumps(arguments))
    assert error.details["field"] == field
    assert f"'{field}'" in error.message


def test_nested_fields_are_named_by_their_path():
    assert _error('{"order": {"items": [{"sku": "a"}, {"qty": 2}]}}',
                  NESTED).details["field"] == "order.items[1].sku"
    assert _error('{"order": {"items": [], "speed": "drone"}}',
                  NESTED).details["field"] == "order.speed"
    assert _error('{"order": {"items": [{"sku": "a", "qty": 0}]}}',
                  NESTED).details["field"] == "order.items[0].qty"


@pytest.mark.parametrize("text", ['{"date": ', "[1, 2]", '"text"', "null"])
def test_text_that_is_not_a_json_object_is_refused(text):
    assert "field" not in _error(text).details


def test_empty_arguments_mean_an_empty_object():
    validator = make_validator(load_tool_schema("find_bookings"))
    assert parse_arguments("", validator) == {}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=8))
def test_any_json_either_validates_or_gives_a_tool_error(value):
    try:
        parsed = parse_arguments(json.dumps(value), BOOKING)
    except ToolError as exc:
        assert exc.code == "invalid_arguments"
    else:
        assert isinstance(parsed, dict)
        jsonschema.validate(parsed, load_tool_schema("create_booking"))


def test_every_shipped_tool_schema_is_an_object_schema_without_repository_keys():
    folder = resources.files("schemas").joinpath("tools")
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
    assert len(names) >= 9
    for name in names:
        schema = load_tool_schema(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert "$schema" not in schema and "$id" not in schema


async def _noop(arguments, context):
    return {}


def test_a_spec_refuses_bad_names_schemas_and_timeouts():
    params = {"type": "object", "properties": {}}
    with pytest.raises(ConfigError, match="must match"):
        ToolSpec("book a table", "x", params, _noop)
    with pytest.raises(ConfigError, match="object schema"):
        ToolSpec("t", "x", {"type": "string"}, _noop)
    with pytest.raises(ConfigError, match="invalid schema"):
        ToolSpec("t", "x", {"type": "object", "properties": {"a": {"type": "nope"}}}, _noop)
    with pytest.raises(ConfigError, match="timeout"):
        ToolSpec("t", "x", params, _noop, SideEffect.READ_ONLY, 0)


def test_a_spec_renders_as_an_openai_and_a_realtime_tool():
    spec = ToolSpec("get_payment", "Look up a payment.", load_tool_schema("get_payment"), _noop)
    chat = spec.openai_tool()
    assert chat["type"] == "function"
    assert chat["function"]["name"] == "get_payment"
    assert chat["function"]["parameters"]["required"] == ["payment_id"]
    realtime = spec.realtime_tool()
    assert realtime["name"] == "get_payment" and "function" not in realtime
