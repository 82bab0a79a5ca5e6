"""What the caller has heard, from the marks Twilio echoes.

After each piece of audio the bridge sends a mark named for the response, the item and
the audio's end (ms into the item). Twilio echoes a mark when the audio before it has
played, so the latest echoed mark of an item is how much of it the caller heard. Sending
waits while more than `ahead_ms` is queued at Twilio, so a `clear` throws little away and
the item is cut where the caller stopped hearing it. After a `clear` Twilio echoes the
marks it dropped; those of a stopped response are ignored.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable


def _name(response_id: str, item_id: str, end_ms: int) -> str:
    return f"{response_id}:{item_id}:{end_ms}"


class MarkLedger:
    def __init__(self, on_stop: Callable[[str], None], *, ahead_ms: int = 1000):
        self.ahead_ms = ahead_ms
        self._on_stop = on_stop
        self._sent: defaultdict[str, int] = defaultdict(int)      # response → ms sent
        self._played: defaultdict[str, int] = defaultdict(int)    # response → ms played
        self._item_sent: defaultdict[str, int] = defaultdict(int)
        self._item_played: dict[str, int] = {}
        self._stopped: set[str] = set()
        self._changed = asyncio.Event()

    # -- the bridge's side ------------------------------------------------------------------

    async def room(self, response_id: str) -> bool:
        """Wait until Twilio holds at most `ahead_ms` unplayed; False when the response
        was stopped meanwhile (its audio is not to be sent)."""
        while response_id not in self._stopped and self.queued_ms() > self.ahead_ms:
            await self._wait()
        return response_id not in self._stopped

    def sent(self, response_id: str, item_id: str, ms: int) -> str:
        """Record `ms` of the item's audio sent; returns the mark to send after it."""
        self._sent[response_id] += ms
        self._item_sent[item_id] += ms
        return _name(response_id, item_id, self._item_sent[item_id])

    def echoed(self, name: str) -> None:
        """Twilio played up to mark `name` (ignored for stopped responses and names that
        are not ours)."""
        response_id, _, rest = name.partition(":")
        item_id, _, end = rest.rpartition(":")
        if response_id in self._stopped or not item_id or not end.isdigit():
            return
        end_ms = int(end)
        before = self._item_played.get(item_id, 0)
        if end_ms > before:
            self._item_played[item_id] = end_ms
            self._played[response_id] += end_ms - before
        self._wake()

    def queued_ms(self) -> int:
        """Audio at Twilio not yet played, over the responses still playing."""
        return sum(self._sent[r] - self._played[r] for r in self._sent
                   if r not in self._stopped)

    # -- the session's side (agent.realtime.engines.Playback) ------------------------------

    async def drained(self, response_id: str) -> None:
        while (response_id not in self._stopped
               and self._played[response_id] < self._sent[response_id]):
            await self._wait()

    def stop(self, response_id: str) -> None:
        if response_id in self._stopped:
            return
        playing = self._played[response_id] < self._sent[response_id]
        self._stopped.add(response_id)
        self._wake()
        if playing:
            self._on_stop(response_id)

    def played_ms(self, item_id: str) -> int | None:
        if item_id not in self._item_sent:
            return None
        return self._item_played.get(item_id, 0)

    # -- waiting ---------------------------------------------------------------------------

    async def _wait(self) -> None:
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
