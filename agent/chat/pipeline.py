"""One chat completion as a stream of flat events: text, audio bytes, the end.

    LLM text deltas ──► TextDelta events (the transcript, as it is written)
                   └──► clause-level TTS ──► streaming encoder ──► AudioData events

Both branches run in one task group per choice, so audio starts while the text is still
being written, and cancelling the consumer (a client that went away) cancels generation,
synthesis and encoding together. Several choices (`n`) run concurrently; the decoder's
scheduler batches their decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from agent.audio import StreamingEncoder, encode_audio
from agent.chat.request import ChatRequest
from agent.chat.tool_stream import CallFragment, ToolStream
from agent.decoder.grammar import (
    CALL_CLOSE,
    CALL_OPEN,
    ToolCallGrammar,
    describe_tools,
    native_tool_template,
    parse_tool_calls,
)
from agent.decoder.scheduler import GenerationRequest
from agent.dispatch.types import ToolCall  # what the model called; the dispatcher runs it
from agent.errors import InvalidRequestError
from agent.runtime import Runtime

# Usage rule: audio counts 10 tokens per second, input and output alike (documented in
# the README); text counts the local model's own tokens.
AUDIO_TOKENS_PER_SECOND = 10


@dataclass(frozen=True)
class TextDelta:
    choice: int
    text: str


@dataclass(frozen=True)
class AudioData:
    choice: int
    data: bytes


@dataclass(frozen=True)
class ChoiceDone:
    choice: int
    finish_reason: str
    text: str
    audio_id: str | None
    audio_seconds: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    choice: int
    fragment: CallFragment


Event = TextDelta | AudioData | ToolCallDelta | ChoiceDone


def audio_tokens(seconds: float) -> int:
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


@dataclass
class Plan:
    """Everything checked before the first byte goes out, so that a bad request still gets
    a proper 4xx even when the reply would have been streamed."""

    request: ChatRequest
    scheduler: Any
    tts: Any
    prompt_ids: list[int]
    max_tokens: int
    grammar: ToolCallGrammar | None = None
    # The decoder session whose KV cache this conversation keeps (realtime sessions).
    session_id: str | None = None


async def plan_completion(request: ChatRequest, messages: list[dict], runtime: Runtime,
                          *, session_id: str | None = None) -> Plan:
    if request.tool_choice not in (None, "none", "auto") and not request.tools:
        raise InvalidRequestError("tool_choice requires tools: name the tools the model may "
                                  "call in `tools`.", param="tool_choice", code="invalid_value")
    scheduler = await runtime.scheduler(request.model.target)
    prompt_ids = await asyncio.to_thread(_prompt_ids, scheduler, messages, request)
    max_tokens = _max_tokens(request, len(prompt_ids), scheduler.max_seq_len,
                             runtime.settings.max_output_tokens)
    tts = await runtime.tts() if request.audio else None
    grammar = None
    if request.tool_mode is not None:
        grammar = await asyncio.to_thread(
            ToolCallGrammar, scheduler.engine.tokenizer, request.tools,
            choice=request.tool_mode, parallel=request.parallel_tool_calls)
    return Plan(request, scheduler, tts, prompt_ids, max_tokens, grammar, session_id)


async def run_completion(plan: Plan, *, streaming: bool, audio_ids: list[str] | None = None
                         ) -> AsyncGenerator[Event, None]:
    """Every choice's events, interleaved as they happen.

    `audio_ids` names each choice's audio (a streaming client sees the id before the end).
    """
    request = plan.request
    audio_ids = audio_ids or [f"audio_{uuid.uuid4().hex}" for _ in range(request.n)]
    queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def produce() -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(request.n):
                group.create_task(_one_choice(index, plan, queue, streaming,
                                              audio_ids[index]))
        await queue.put(None)

    producer = asyncio.create_task(produce())
    try:
        while (event := await queue.get()) is not None:
            yield event
        await producer
    finally:
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer


def _prompt_ids(scheduler, messages: list[dict], request: ChatRequest) -> list[int]:
    tokenizer = scheduler.engine.tokenizer
    offered = request.tools if request.tool_mode not in (None, "none") else []
    if native_tool_template(tokenizer):
        return tokenizer.encode_chat(_native_messages(messages), tools=offered or None)
    return tokenizer.encode_chat(_parley_tool_messages(messages, offered))


def _arguments(call: dict[str, Any]) -> Any:
    text = call.get("function", call).get("arguments") or "{}"
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def _legacy(message: dict) -> dict:
    """Legacy `function_call` / role `function` messages as tool messages."""
    if message.get("role") == "function":
        return {"role": "tool", "content": message.get("content") or "",
                "name": message.get("name")}
    if message.get("function_call"):
        call = message["function_call"]
        return {**message, "tool_calls": [{"id": "call_legacy", "type": "function",
                                           "function": call}]}
    return message


def _native_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls with arguments as objects: the template serialises them."""
    out = []
    for m in map(_legacy, messages):
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {"name": c["function"]["name"],
                                                        "arguments": _arguments(c)}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def _parley_tool_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Parley's tool format for templates without a tools branch (SmolLM2): the tools are
    described in the system message, calls are written as the grammar writes them, and a
    tool's result comes back as a user turn wrapped in <tool_response>."""
    out = []
    for m in map(_legacy, messages):
        if m.get("tool_calls"):
            text = "\n".join(f"{CALL_OPEN}\n" + json.dumps(
                {"name": c["function"]["name"], "arguments": _arguments(c)},
                ensure_ascii=False) + f"\n{CALL_CLOSE}" for c in m["tool_calls"])
            m = {"role": "assistant", "content": text}
        elif m.get("role") == "tool":
            m = {"role": "user",
                 "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools:
        described = describe_tools(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _max_tokens(request: ChatRequest, prompt: int, window: int, default: int) -> int:
    room = window - prompt
    if room <= 0:
        raise InvalidRequestError(
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt} tokens.", param="messages", code="context_length_exceeded")
    if request.max_tokens is not None:
        if request.max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {prompt + request.max_tokens} tokens ({prompt} in the messages, "
                f"{request.max_tokens} in the completion).", param="max_completion_tokens",
                code="context_length_exceeded")
        return request.max_tokens
    return min(default, room)


async def _one_choice(index: int, plan: Plan, queue: asyncio.Queue, streaming: bool,
                      audio_id: str) -> None:
    request = plan.request
    params = replace(request.sampling(index), max_tokens=plan.max_tokens)
    if plan.grammar is not None:
        params = replace(params, mask_fn=plan.grammar.mask_fn())
    generation = plan.scheduler.generate(
        GenerationRequest(prompt_ids=plan.prompt_ids, params=params,
                          session_id=plan.session_id))
    text_parts: list[str] = []
    split = ToolStream() if plan.grammar is not None else None
    finish = "stop"
    usage = None
    to_speech: asyncio.Queue[str | None] = asyncio.Queue()

    async def write_text() -> None:
        nonlocal finish, usage
        try:
            async for delta in generation:
                if delta.text:
                    text_parts.append(delta.text)
                    shown, fragments = split.push(delta.text) if split else (delta.text, [])
                    for fragment in fragments:
                        await queue.put(ToolCallDelta(index, fragment))
                    if shown:  # a tool call is never spoken: only text goes to speech
                        await queue.put(TextDelta(index, shown))
                        await to_speech.put(shown)
                if delta.finish_reason is not None:
                    finish, usage = delta.finish_reason, delta.usage
            for fragment in split.finish() if split else []:
                await queue.put(ToolCallDelta(index, fragment))
        finally:
            await to_speech.put(None)

    async with asyncio.TaskGroup() as group:
        group.create_task(write_text())
        speech = group.create_task(
            _speak(index, request, plan.tts, to_speech, queue, streaming)) \
            if request.audio else None
    seconds = speech.result() if speech else 0.0
    text, calls = "".join(text_parts), tuple[ToolCall, ...]()
    if split is not None and split.mode == "calls":
        head, parsed = parse_tool_calls(text)
        calls = tuple(ToolCall(split.calls[i][0] if i < len(split.calls) else "", c.name,
                               c.arguments) for i, c in enumerate(parsed))
        text = head
        if calls and finish == "stop":
            finish = "function_call" if request.legacy_functions else "tool_calls"
    await queue.put(ChoiceDone(
        choice=index, finish_reason=finish, text=text, tool_calls=calls,
        audio_id=audio_id if request.audio else None,
        audio_seconds=seconds, prompt_tokens=usage.prompt_tokens if usage else len(plan.prompt_ids),
        cached_tokens=usage.cached_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0))


async def _speak(index: int, request: ChatRequest, tts, text: asyncio.Queue[str | None],
                 queue: asyncio.Queue, streaming: bool) -> float:
    """Synthesise the text as it arrives; return the seconds of audio produced."""
    assert request.audio is not None

    async def deltas() -> AsyncIterator[str]:
        while (piece := await text.get()) is not None:
            yield piece

    encoder: StreamingEncoder | None = None
    whole: list = []
    rate = 0
    seconds = 0.0
    async for chunk in tts.stream(deltas(), request.audio.voice, request.audio.speed):
        if not len(chunk.pcm):
            continue
        rate = chunk.rate
        seconds += chunk.duration
        if not streaming:
            whole.append(chunk.pcm)
            continue
        encoder = encoder or StreamingEncoder(request.audio.format, chunk.rate)
        if data := await asyncio.to_thread(encoder.feed, chunk.pcm):
            await queue.put(AudioData(index, data))
    if streaming and encoder is not None:
        if data := await asyncio.to_thread(encoder.close):
            await queue.put(AudioData(index, data))
    elif whole:
        import numpy as np

        pcm = np.concatenate(whole)
        await queue.put(AudioData(index, await asyncio.to_thread(
            encode_audio, pcm, rate, request.audio.format)))
    return seconds
