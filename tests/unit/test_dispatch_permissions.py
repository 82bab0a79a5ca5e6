"""Which tools a key and a session may use, and how a result goes back to the model."""

import json
import logging

from agent.dispatch import (
    CallContext,
    ToolCall,
    ToolPermissions,
    ToolResult,
    call_from_chat,
    call_from_item,
    function_call_output_item,
    tool_message,
)

TOOLS = ["search_knowledge_base", "check_availability", "create_booking", "cancel_booking",
         "create_payment", "refund_payment", "get_payment"]


def test_keys_not_listed_get_the_default_and_listed_keys_their_patterns():
    rules = ToolPermissions(default_allow=("search_*", "check_availability"),
                            by_key={"sk-till": ("*_payment", "search_knowledge_base")})
    assert rules.allowed(CallContext("s", "sk-other"), TOOLS) == [
        "search_knowledge_base", "check_availability"]
    assert rules.allowed(CallContext("s", None), TOOLS) == [
        "search_knowledge_base", "check_availability"]
    assert rules.allowed(CallContext("s", "sk-till"), TOOLS) == [
        "search_knowledge_base", "create_payment", "refund_payment", "get_payment"]


def test_a_session_can_narrow_but_never_widen_what_its_key_may_use():
    rules = ToolPermissions(default_allow=("search_knowledge_base", "*_booking"))
    narrowed = CallContext("s", "k", allowed_tools=frozenset({"cancel_booking"}))
    assert rules.allowed(narrowed, TOOLS) == ["cancel_booking"]
    widened = CallContext("s", "k", allowed_tools=frozenset({"create_payment"}))
    assert rules.allowed(widened, TOOLS) == []
    assert rules.why_denied(widened, "refund_payment") == "not enabled for this session"
    assert rules.why_denied(CallContext("s", "k"), "refund_payment") == \
        "not allowed for this API key"


def test_a_denial_is_logged_without_the_key(caplog):
    rules = ToolPermissions(default_allow=())
    with caplog.at_level(logging.WARNING, logger="agent.dispatch.permissions"):
        rules.log_denial(CallContext("sess_9", "sk-secret-value"), "create_payment", "call_1")
    line = caplog.records[-1].getMessage()
    assert "create_payment" in line and "sess_9" in line and "call_1" in line
    assert "sk-secret-value" not in line and "key_" in line


def test_results_become_a_tool_message_and_a_realtime_item():
    result = ToolResult("call_7", "get_payment", True, {"status": "succeeded", "amount": "€5"})
    message = tool_message(result)
    assert message["role"] == "tool" and message["tool_call_id"] == "call_7"
    assert json.loads(message["content"]) == {"status": "succeeded", "amount": "€5"}
    item = function_call_output_item(result)
    assert item["type"] == "function_call_output" and item["call_id"] == "call_7"
    assert json.loads(item["output"]) == result.output


def test_an_error_result_reads_as_an_error_object():
    call = ToolCall("call_8", "cancel_booking", '{"reference": "R-AAAAAA"}')
    result = ToolResult.failure(call, "not_found", "no booking has that reference")
    body = json.loads(tool_message(result)["content"])
    assert body == {"error": {"code": "not_found", "message": "no booking has that reference"}}
    assert ToolResult.from_json(result.to_json()) == result


def test_calls_are_read_from_both_apis():
    chat = {"id": "call_1", "type": "function",
            "function": {"name": "get_payment", "arguments": '{"payment_id": "x"}'}}
    assert call_from_chat(chat) == ToolCall("call_1", "get_payment", '{"payment_id": "x"}')
    item = {"type": "function_call", "call_id": "call_2", "name": "get_payment",
            "arguments": "{}"}
    assert call_from_item(item) == ToolCall("call_2", "get_payment", "{}")


def test_the_call_fingerprint_ignores_spacing_and_key_order():
    a = ToolCall("1", "f", '{"a": 1, "b": [1, 2]}')
    b = ToolCall("2", "f", '{"b":[1,2],"a":1}')
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != ToolCall("3", "f", '{"a": 2, "b": [1, 2]}').fingerprint()
    assert a.fingerprint() != ToolCall("4", "g", '{"a": 1, "b": [1, 2]}').fingerprint()
