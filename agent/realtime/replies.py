"""Where a realtime session's replies come from: the chat pipeline on the session's cache.

`ChatReplies` runs agent.chat.pipeline (decoder with the session's KV cache, the tool
grammar, clause-level TTS, the streaming encoder) for a conversation. The response writer
and the held reply depend only on the `Replies` protocol, so their tests pass a fake that
yields pipeline events without a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Protocol

from agent.audio.encode import StreamingEncoder
from agent.chat.pipeline import AudioData, ChoiceDone, TextDelta, plan_completion, run_completion
from agent.chat.request import AudioOutput, ChatRequest
from agent.model_ids import ServedModel
from agent.realtime.conversation import as_messages
from agent.realtime.protocol import new_item_id
from agent.realtime.session_config import SessionConfig
from agent.runtime import Runtime


class Replies(Protocol):
    def events(self, config: SessionConfig, messages: list[dict[str, Any]], *,
               max_tokens: int | None = None, audio: bool = True) -> AsyncGenerator[Any, None]:
        """The pipeline's events (TextDelta, AudioData, ToolCallDelta, ChoiceDone)."""
        ...

    async def prefill(self, config: SessionConfig, items: list[dict[str, Any]],
                      heard: str | None = None) -> None:
        """Warm the cache with the conversation `items` (and `heard` as a user turn)."""
        ...

    def say(self, config: SessionConfig, text: str) -> AsyncGenerator[Any, None]:
        """Events that speak `text` word for word (no model): a greeting."""
        ...


def spoken_item(transcript: str) -> dict[str, Any]:
    """A user message item holding `transcript`, as a committed spoken turn becomes."""
    return {"type": "message", "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript}]}


class ChatReplies:
    """Replies from the chat pipeline, on decoder cache slot `decoder_session`."""

    def __init__(self, runtime: Runtime, served: ServedModel, decoder_session: str,
                 tools: Callable[[SessionConfig], list[dict[str, Any]]]):
        self.runtime = runtime
        self.served = served
        self.decoder_session = decoder_session
        self.tools = tools

    def request(self, config: SessionConfig, messages: list[dict[str, Any]], *,
                max_tokens: int | None = None, audio: bool = True) -> ChatRequest:
        """The chat pipeline's request for a response with `config`."""
        if max_tokens is None and config.max_output_tokens != "inf":
            max_tokens = int(config.max_output_tokens)
        return ChatRequest(
            model=self.served, messages=messages,
            audio=AudioOutput(config.voice, config.output_format.codec, config.speed)
            if audio and config.audio_output else None,
            stream=True, include_usage=False, n=1, temperature=config.temperature, top_p=1.0,
            seed=None, stop=[], max_tokens=max_tokens, tools=self.tools(config),
            # One call per response, as gpt-realtime makes them (OpenAI offers parallel
            # calls to reasoning models only; the session accepts and ignores the flag).
            # Given the choice, a small model repeats calls with varied arguments until
            # max_output_tokens, and a response cut short runs none of its server tools.
            tool_choice=config.tool_choice, parallel_tool_calls=False)

    async def events(self, config: SessionConfig, messages: list[dict[str, Any]], *,
                     max_tokens: int | None = None, audio: bool = True,
                     ) -> AsyncGenerator[Any, None]:
        request = self.request(config, messages, max_tokens=max_tokens, audio=audio)
        plan = await plan_completion(request, messages, self.runtime,
                                     session_id=self.decoder_session)
        async with aclosing(run_completion(plan, streaming=True,
                                           audio_ids=[new_item_id()])) as events:
            async for event in events:
                yield event

    async def prefill(self, config: SessionConfig, items: list[dict[str, Any]],
                      heard: str | None = None) -> None:
        """Generate one throw-away token on the conversation so far, so its KV cache is
        ready; the next response's prompt shares that prefix and prefills only what's new.

        `heard`: a partial transcript of the turn in progress, as a user message at the
        end. The reply's prompt shares the words the final transcript keeps; where they
        differ the scheduler's prefix match drops the rest (the rollback)."""
        if heard is not None:
            items = [*items, spoken_item(heard)]
        messages = as_messages(config.instructions, items)
        async with aclosing(self.events(config, messages, max_tokens=1,
                                        audio=False)) as events:
            async for _ in events:
                pass

    async def say(self, config: SessionConfig, text: str) -> AsyncGenerator[Any, None]:
        yield TextDelta(0, text)
        seconds = 0.0
        if config.audio_output:
            tts = await self.runtime.tts()
            encoder: StreamingEncoder | None = None
            async for chunk in tts.stream(text, config.voice, config.speed):
                if not len(chunk.pcm):
                    continue
                seconds += chunk.duration
                encoder = encoder or StreamingEncoder(config.output_format.codec, chunk.rate)
                if data := await asyncio.to_thread(encoder.feed, chunk.pcm):
                    yield AudioData(0, data)
            if encoder is not None and (data := await asyncio.to_thread(encoder.close)):
                yield AudioData(0, data)
        yield ChoiceDone(0, "stop", text, None, seconds, 0, 0, 0)
