"""The events a realtime session has for its client: two lanes, bounded, cancellable.

- The control lane carries the session's own events (speech started and stopped, buffer
  commits, transcripts, errors, session updates). They go out first, so a barge-in is
  never announced behind seconds of audio.
- The response lane carries each response's events in order, stamped with the response's
  generation. It is bounded in events and in unsent audio (`audio_ahead_ms`): a client that
  reads slowly slows synthesis down instead of queueing a long answer, so what a barge-in
  has to throw away is short. A held generation's audio waits at the head of the lane
  (while the user speaks over it and the verdict is open); a cancelled generation's unsent
  audio is dropped, and so is any it still produces — its other events still go, so the
  client sees its items close and its `response.done`.

Once the connection is gone nothing will read again: `close()` turns every waiting and
later `put` into a drop, so a response finishing its bookkeeping, or the session closing,
never waits on a full outbox (and never keeps its decoder slot).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    generation: int
    event: Event
    audio_ms: int   # > 0: an audio delta of that many milliseconds


class Outbox:
    def __init__(self, maxsize: int, audio_ahead_ms: int):
        self.maxsize = maxsize
        self.audio_ahead_ms = audio_ahead_ms
        self._control: deque[Event] = deque()
        self._responses: deque[_Entry] = deque()
        self._queued_audio_ms = 0
        self._sent_audio_ms: defaultdict[int, int] = defaultdict(int)
        self._held: set[int] = set()
        self._cancelled: set[int] = set()
        self._closed = False
        self._finishing = False
        self._changed = asyncio.Event()

    # -- producers ---------------------------------------------------------------------------

    async def put(self, event: Event, generation: int | None = None,
                  audio_ms: int = 0) -> None:
        """Queue a session event (no generation) or response `generation`'s event, waiting
        for room; dropped if the outbox is or becomes closed, and an audio delta
        (`audio_ms` > 0) of a cancelled generation is dropped too."""
        if generation is None:
            await self._until(lambda: len(self._control) < self.maxsize)
            if not self._closed:
                self._control.append(event)
                self._wake()
            return
        await self._until(lambda: (generation in self._cancelled and audio_ms > 0)
                          or self._response_room(audio_ms))
        if self._closed or (audio_ms > 0 and generation in self._cancelled):
            return
        self._responses.append(_Entry(generation, event, audio_ms))
        self._queued_audio_ms += audio_ms
        self._wake()

    def _response_room(self, audio_ms: int) -> bool:
        return len(self._responses) < self.maxsize and (
            audio_ms == 0 or self._queued_audio_ms < self.audio_ahead_ms)

    def hold(self, generation: int) -> None:
        """Keep `generation`'s audio (and what follows it) back until `release`."""
        self._held.add(generation)
        self._wake()

    def release(self, generation: int) -> None:
        self._held.discard(generation)
        self._wake()

    def cancel(self, generation: int) -> None:
        """Drop `generation`'s unsent audio, now and from now on."""
        self._cancelled.add(generation)
        self._held.discard(generation)
        kept = deque(e for e in self._responses
                     if e.generation != generation or e.audio_ms == 0)
        self._queued_audio_ms -= sum(e.audio_ms for e in self._responses) - \
            sum(e.audio_ms for e in kept)
        self._responses = kept
        self._wake()

    def sent_audio_ms(self, generation: int) -> int:
        """How much of `generation`'s audio has been handed to the connection."""
        return self._sent_audio_ms[generation]

    def finish(self) -> None:
        """Stop once what is queued has gone (held audio is not waited for)."""
        self._finishing = True
        self._wake()

    def close(self) -> None:
        """No one will read again: release every waiting producer, drop what is queued."""
        self._closed = True
        self._control.clear()
        self._responses.clear()
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the connection's writer -------------------------------------------------------------

    async def get(self) -> Event | None:
        """The next event to send; None once closed, or finished and drained."""
        await self._until(lambda: self._next_ready() or self._finishing)
        if self._closed or not self._next_ready():
            return None
        if self._control:
            event = self._control.popleft()
        else:
            entry = self._responses.popleft()
            self._queued_audio_ms -= entry.audio_ms
            self._sent_audio_ms[entry.generation] += entry.audio_ms
            event = entry.event
        self._wake()
        return event

    def _next_ready(self) -> bool:
        if self._control:
            return True
        if not self._responses:
            return False
        head = self._responses[0]
        return not (head.audio_ms > 0 and head.generation in self._held)

    def qsize(self) -> int:
        return len(self._control) + len(self._responses)

    # -- waiting -----------------------------------------------------------------------------

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` or the outbox closes. Every change wakes every waiter, which
        looks again: one session has a handful of producers and one reader."""
        while not self._closed and not ready():
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
