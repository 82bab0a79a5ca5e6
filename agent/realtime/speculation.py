"""A reply started during the end-of-turn silence and held until the turn is confirmed.

When the VAD hears silence begin (SpeechPaused), the turn may be over, or the user may be
taking a breath. Waiting out `silence_duration_ms` before doing anything puts the whole
ASR pass, the prompt's prefill and the first clause's synthesis after that wait. Instead,
as soon as the speculative ASR pass of the pause is done and nobody has spoken since, the
session starts the reply it would give to that transcript: the chat pipeline runs
(decoder, TTS) and its events are held here, unsent.

- The turn ends at that pause with the same words and nothing else changed in between
  (same messages, same session configuration): the response adopts the held events and
  the live rest, so its first audio leaves as soon as the turn is confirmed.
- The user speaks again, or anything differs: the reply is cancelled. Nothing was sent,
  the decoder stops within a step, and its KV cache keeps the conversation's prefix,
  so the next reply prefills only the new words (the scheduler's prefix reuse).

Tool calls are only executed after a response is done, so a speculative reply that is
dropped never runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from agent.realtime.conversation import as_messages
from agent.realtime.replies import Replies, spoken_item
from agent.realtime.session_config import SessionConfig
from agent.speech.transcript import Transcript

log = logging.getLogger(__name__)
_END = object()


class SpeculativeTranscriber(Protocol):
    async def speculative(self, speech_end: int) -> Transcript | None: ...


class Speculation:
    """One speculative reply to the speech that ended at sample `speech_end`.

    `items`: the conversation at the pause; `voiced_until`: where the user's voice ends
    now (None once the turn is over), to tell whether they went on speaking."""

    def __init__(self, turn: SpeculativeTranscriber, speech_end: int, *,
                 config: SessionConfig, items: list[dict[str, Any]], replies: Replies,
                 voiced_until: Callable[[], int | None]):
        self.speech_end = speech_end
        self.config = config
        self.text: str | None = None  # the transcript it answers, once known
        self._items = list(items)
        self._replies = replies
        self._voiced_until = voiced_until
        self.messages: list[dict[str, Any]] | None = None
        # Held pipeline events. Bounded by the reply itself (max_output_tokens and its
        # audio), the same as what the response would have queued for sending.
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._decided = asyncio.Event()  # set once `text` is known, or known to be None
        self._task = asyncio.get_running_loop().create_task(self._run(turn))

    async def _run(self, turn: Any) -> None:
        try:
            transcript = await turn.speculative(self.speech_end)
            text = transcript.text.strip() if transcript is not None else ""
            voiced = self._voiced_until()  # None: the turn has ended meanwhile
            if not text or (voiced is not None and voiced > self.speech_end):
                return  # nothing heard, or the user went on speaking meanwhile
            self.text = text
            # The conversation as it was at the pause: by now the turn may have been
            # committed into it (and would count twice).
            self.messages = as_messages(self.config.instructions,
                                        [*self._items, spoken_item(text)])
            self._decided.set()
            async with contextlib.aclosing(self._replies.events(self.config,
                                                               self.messages)) as events:
                async for event in events:
                    self._events.put_nowait(event)
        except Exception as exc:  # the real response will meet (and report) the same fault
            log.warning("speculative reply failed: %s", exc)
            self._events.put_nowait(exc)
        finally:
            self._decided.set()
            self._events.put_nowait(_END)

    async def decided(self) -> None:
        """Wait until the reply has started or given up (both wait on the same ASR pass
        as the turn's final transcript, so this is at most a moment after it)."""
        await self._decided.wait()

    def matches(self, speech_end: int | None, text: str, config: SessionConfig,
                messages: list[dict[str, Any]]) -> bool:
        """Whether this reply is the one the confirmed turn would get."""
        return (not self._task.cancelled() and self.speech_end == speech_end
                and self.text == text and self.config is config and self.messages == messages)

    async def events(self) -> AsyncGenerator[Any, None]:
        """The pipeline's events, held ones first, then live ones as they come. Closing
        this (the response is done, cancelled or failed) stops the reply's pipeline."""
        try:
            while (event := await self._events.get()) is not _END:
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
