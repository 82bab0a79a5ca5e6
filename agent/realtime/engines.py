"""The engines a realtime session drives, as the protocols it needs of them.

The session is typed against these, not against the concrete models, so that its tests
run on fakes: a VAD scorer, a transcriber, a reply source and a tool runner that answer
in microseconds. The real ones are SileroVad, ASREngine, ChatReplies (the chat pipeline:
decoder, grammar, TTS, encoder) and the tool Dispatcher.
"""

from __future__ import annotations

from typing import Any, Protocol

from agent.audio.vad import FrameScorer
from agent.dispatch import CallContext, ToolCall, ToolResult, ToolSpec
from agent.realtime.replies import Replies
from agent.speech.asr_stream import Transcriber

__all__ = ["FrameScorer", "Replies", "ToolRunner", "Transcriber"]


class ToolRunner(Protocol):
    """The server-side tools (agent.dispatch.Dispatcher)."""

    def tool_specs(self, context: CallContext) -> list[ToolSpec]: ...

    def openai_tools(self, context: CallContext) -> list[dict[str, Any]]: ...

    async def execute(self, call: ToolCall, context: CallContext) -> ToolResult: ...
