"""Tool calls in and results out, in the conversation shapes of OpenAI's two APIs.

Chat Completions carries a call in the assistant message's `tool_calls` and the result as
a `role: "tool"` message; the Realtime API carries them as `function_call` and
`function_call_output` conversation items. Either way the result is a JSON string.
"""

from __future__ import annotations

import json
from typing import Any

from agent.dispatch.types import ToolCall, ToolResult


def tool_message(result: ToolResult) -> dict[str, Any]:
    """The Chat Completions message that re-injects a result into the conversation."""
    return {"role": "tool", "tool_call_id": result.call_id, "content": result_content(result)}


def function_call_output_item(result: ToolResult) -> dict[str, Any]:
    """The Realtime conversation item that re-injects a result."""
    return {"type": "function_call_output", "call_id": result.call_id,
            "output": result_content(result)}


def result_content(result: ToolResult) -> str:
    """The JSON text the model reads: the output, which for failures is {"error": ...}."""
    return json.dumps(result.output, ensure_ascii=False, separators=(",", ":"))


def call_from_chat(tool_call: dict[str, Any]) -> ToolCall:
    """A ToolCall from an entry of a Chat Completions `message.tool_calls` list."""
    function = tool_call.get("function") or {}
    return ToolCall(str(tool_call["id"]), str(function.get("name", "")),
                    str(function.get("arguments") or ""))


def call_from_item(item: dict[str, Any]) -> ToolCall:
    """A ToolCall from a Realtime `function_call` conversation item."""
    return ToolCall(str(item["call_id"]), str(item.get("name", "")),
                    str(item.get("arguments") or ""))
