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

__all__ = ["FrameScorer", "Playback", "Replies", "ToolRunner", "Transcriber"]


class ToolRunner(Protocol):
    """The server-side tools (agent.dispatch.Dispatcher)."""

    def tool_specs(self, context: CallContext) -> list[ToolSpec]: ...

    def openai_tools(self, context: CallContext) -> list[dict[str, Any]]: ...

    async def execute(self, call: ToolCall, context: CallContext) -> ToolResult: ...


class Playback(Protocol):
    """The listener's playback, where the server can know it (a phone bridge learns it
    from the marks Twilio echoes). Without one, a response ends when its last event is
    queued and the client truncates what it did not play."""

    async def drained(self, response_id: str) -> None:
        """Return once everything the response sent has been played (or the playing was
        stopped)."""
        ...

    def stop(self, response_id: str) -> None:
        """The listener barged in: drop what of the response is still queued to play."""
        ...

    def played_ms(self, item_id: str) -> int | None:
        """How much of item `item_id`'s audio was played (None: nothing known)."""
        ...
