"""Tool dispatch: a registry of backends, validated and permitted calls, recorded once.

    dispatcher = await open_dispatcher(settings, store)   # agent.dispatch.catalog
    tools = dispatcher.openai_tools(context)        # offer these to the model
    result = await dispatcher.execute(call, context)
    conversation.append(tool_message(result))        # re-inject for the next turn
"""

from agent.dispatch.dispatcher import Dispatcher
from agent.dispatch.messages import (
    call_from_chat,
    call_from_item,
    function_call_output_item,
    result_content,
    tool_message,
)
from agent.dispatch.permissions import ToolPermissions
from agent.dispatch.registry import ToolRegistry
from agent.dispatch.spec import ToolSpec, load_tool_schema
from agent.dispatch.types import (
    CallContext,
    ErrorCode,
    SideEffect,
    ToolCall,
    ToolError,
    ToolResult,
)

__all__ = [
    "CallContext", "Dispatcher", "ErrorCode", "SideEffect", "ToolCall", "ToolError",
    "ToolPermissions", "ToolRegistry", "ToolResult", "ToolSpec", "call_from_chat",
    "call_from_item", "function_call_output_item", "load_tool_schema", "result_content",
    "tool_message",
]
