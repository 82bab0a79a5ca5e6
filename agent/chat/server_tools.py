"""Server-side tool execution in Chat Completions (Parley's extension).

With `parley.execute_tools` (or for an API key the tools config lists), the dispatcher's
tools are offered next to the client's own. When the model calls one of them, Parley runs
it, appends the call and its result to the conversation, and asks the model again, until
the model answers in words or calls a client tool — then the reply goes out as usual:

    round 1: model ──► <tool_call> search_knowledge_base ──► dispatcher ──► result
    round 2: model reads the result ──► "Refunds take 5 days..." ──► text/audio to client

The client sees one completion. The messages the server added (assistant tool calls and
`role: "tool"` results) come back in `parley.tool_messages`, so a client that keeps its
own history can append them and stay in step with what the model read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from agent.api_keys import executes_tools
from agent.chat.pipeline import (
    ChoiceDone,
    Event,
    Plan,
    ToolCallDelta,
    plan_completion,
    run_completion,
)
from agent.chat.request import ChatRequest
from agent.dispatch import CallContext, ToolCall, tool_message
from agent.dispatch.confirmation import confirmed_in_chat
from agent.errors import InvalidRequestError
from agent.runtime import Runtime

# Rounds of server tool calls before the model must answer in words (one more round).
MAX_TOOL_ROUNDS = 4


@dataclass(frozen=True)
class ServerTools:
    """What one request may run on the server."""

    dispatcher: Any
    context: CallContext
    names: frozenset[str]


@dataclass(frozen=True)
class ToolsRan:
    """The messages the server appended to the conversation in one round."""

    messages: tuple[dict[str, Any], ...]


async def server_tools_for(body: dict[str, Any], chat: ChatRequest, runtime: Runtime,
                           api_key: str | None) -> ServerTools | None:
    """The request's server tools, or None when this request doesn't run tools itself."""
    asked = (body.get("parley") or {}).get("execute_tools")
    if asked is False:
        return None
    dispatcher = await runtime.dispatcher()
    by_key = runtime.tools_config.execute_keys
    if not asked and not ("*" in by_key or (api_key is not None and api_key in by_key)
                          or executes_tools(api_key, runtime.settings)):
        return None
    if chat.n != 1:
        raise InvalidRequestError("execute_tools runs one conversation; use n=1.",
                                  param="n", code="invalid_value")
    context = CallContext(session_id=f"chat:{body.get('user') or 'anonymous'}",
                          api_key=api_key, confirmed=confirmed_in_chat(chat.messages))
    names = frozenset(spec.name for spec in dispatcher.tool_specs(context))
    if clash := sorted(names & {t["function"]["name"] for t in chat.tools}):
        raise InvalidRequestError(
            f"tool name(s) {clash} are server-side tools of this Parley; rename yours or "
            f"send parley.execute_tools: false.", param="tools", code="invalid_value")
    return ServerTools(dispatcher, context, names)


def with_server_tools(chat: ChatRequest, server: ServerTools) -> ChatRequest:
    """The request as the model sees it: the client's tools plus the server's."""
    offered = chat.tools + server.dispatcher.openai_tools(server.context)
    choice = chat.tool_choice if chat.tools or chat.tool_choice in ("none", "required") \
        or isinstance(chat.tool_choice, dict) else "auto"
    return dataclasses.replace(chat, tools=offered, tool_choice=choice)


async def plan_first_round(chat: ChatRequest, messages: list[dict[str, Any]],
                           runtime: Runtime, server: ServerTools) -> Plan:
    """The first round's plan, made before any byte goes out (a bad request gets a 4xx)."""
    return await plan_completion(with_server_tools(chat, server), messages, runtime)


async def run_with_server_tools(first: Plan, messages: list[dict[str, Any]],
                                runtime: Runtime, server: ServerTools, *, streaming: bool,
                                audio_ids: list[str]) -> AsyncIterator[Event | ToolsRan]:
    """Rounds of completion and execution; yields the client-visible events, a ToolsRan
    after each round of execution, and one ChoiceDone (usage summed over the rounds)."""
    request = first.request
    conversation = list(messages)
    spent = _Usage()
    ran: set[str] = set()  # fingerprints of the calls executed so far
    plan: Plan | None = first
    for round_no in range(MAX_TOOL_ROUNDS + 1):
        if plan is None:
            plan = await plan_completion(request, conversation, runtime)
        done: ChoiceDone | None = None
        visible = _ClientCalls(server.names)
        async for event in run_completion(plan, streaming=streaming, audio_ids=audio_ids):
            if isinstance(event, ChoiceDone):
                done = event
            elif isinstance(event, ToolCallDelta):
                if (shown := visible.fragment(event)) is not None:
                    yield shown
            else:
                yield event
        assert done is not None
        spent.add(done)
        ours = [c for c in done.tool_calls if c.name in server.names]
        theirs = tuple(c for c in done.tool_calls if c.name not in server.names)
        fresh = [c for c in ours if c.fingerprint() not in ran]
        if done.finish_reason == "length" or not ours or theirs or round_no == MAX_TOOL_ROUNDS:
            if fresh and done.finish_reason != "length":  # a call cut short is not run
                added = await _execute(fresh, server)
                yield ToolsRan(tuple(added))
            yield dataclasses.replace(done, tool_calls=theirs, **spent.fields())
            return
        if fresh:
            added = await _execute(fresh, server)
            ran.update(c.fingerprint() for c in fresh)
            conversation += added
            yield ToolsRan(tuple(added))
        # The model answers in words once it has nothing new to run (a small model may
        # repeat the call it just made) or has used its rounds; after a forced first call
        # it chooses freely.
        last = not fresh or round_no + 1 == MAX_TOOL_ROUNDS
        request = dataclasses.replace(request, tool_choice="none" if last else "auto")
        plan = None


async def _execute(calls: list[ToolCall], server: ServerTools) -> list[dict[str, Any]]:
    """Run the calls (concurrently: they are independent) and return the messages that
    record them: the assistant's calls, then one tool message per result."""
    results = await asyncio.gather(*(
        server.dispatcher.execute(call, server.context) for call in calls))
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function",
         "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
    return [assistant, *(tool_message(r) for r in results)]


class _ClientCalls:
    """Streams the client's own tool calls and hides the server's, renumbering indexes so
    the client sees 0, 1, ... for its calls alone."""

    def __init__(self, server_names: frozenset[str]):
        self.server_names = server_names
        self.index: dict[int, int | None] = {}

    def fragment(self, event: ToolCallDelta) -> ToolCallDelta | None:
        f = event.fragment
        if f.name is not None:
            shown = sum(1 for v in self.index.values() if v is not None)
            self.index[f.index] = None if f.name in self.server_names else shown
        mapped = self.index.get(f.index)
        if mapped is None:
            return None
        return ToolCallDelta(event.choice, dataclasses.replace(f, index=mapped))


@dataclass
class _Usage:
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    audio_seconds: float = 0.0

    def add(self, done: ChoiceDone) -> None:
        self.prompt += done.prompt_tokens
        self.cached += done.cached_tokens
        self.completion += done.completion_tokens
        self.audio_seconds += done.audio_seconds

    def fields(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "cached_tokens": self.cached,
                "completion_tokens": self.completion, "audio_seconds": self.audio_seconds}
