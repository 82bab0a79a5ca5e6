"""A Realtime conversation: its items in order, kept in the state store as they change.

Items are GA-shaped dicts (`{"id", "object": "realtime.item", "type", ...}`). Audio is
never inside an item here: the bytes of a user turn or an assistant reply are stored by
item id beside the item (with a TTL), and `conversation.item.retrieve` adds them back.
Every change is written through at once, so a client that reconnects to any replica with
the conversation id finds everything that happened up to the moment the link broke.

While the store is unreachable (Redis restarting), changes wait here instead of failing
the session: the conversation goes on in memory, `on_unsaved` tells the session to keep
trying (`flush`), and everything is written through once the store answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.errors import StoreUnavailableError
from agent.realtime.protocol import RealtimeError
from agent.state.store import Store

log = logging.getLogger(__name__)

STATE_KIND = "rt_conversation"
AUDIO_KIND = "rt_audio"


class Conversation:
    def __init__(self, conversation_id: str, store: Store, ttl_s: float):
        self.id = conversation_id
        self.store = store
        self.ttl_s = ttl_s
        self.items: list[dict[str, Any]] = []
        self.session: dict[str, Any] | None = None  # the GA session object, for resuming
        self.on_unsaved: Callable[[], None] | None = None
        self._state_unsaved = False
        self._audio_unsaved: dict[str, bytes] = {}

    # -- persistence ----------------------------------------------------------------------

    @classmethod
    async def resume(cls, conversation_id: str, store: Store, ttl_s: float) -> Conversation:
        """The stored conversation, or RealtimeError when there is none (or it expired)."""
        state = await store.get_json(STATE_KIND, conversation_id)
        if state is None:
            raise RealtimeError(f"no conversation {conversation_id!r} (it may have expired)",
                                code="conversation_not_found", param="conversation_id")
        conversation = cls(conversation_id, store, ttl_s)
        conversation.items = list(state.get("items") or [])
        conversation.session = state.get("session")
        return conversation

    async def save(self) -> None:
        self._state_unsaved = True
        await self.flush()

    async def save_audio(self, item_id: str, audio: bytes) -> None:
        self._audio_unsaved[item_id] = audio
        await self.flush()

    @property
    def unsaved(self) -> bool:
        return self._state_unsaved or bool(self._audio_unsaved)

    async def flush(self) -> bool:
        """Write what the store does not have yet; True when it has everything. With the
        store down, the changes stay here and `on_unsaved` is called."""
        try:
            for item_id, audio in list(self._audio_unsaved.items()):
                await self.store.put_blob(AUDIO_KIND, item_id, audio, ttl_s=self.ttl_s)
                if self._audio_unsaved.get(item_id) is audio:  # not replaced meanwhile
                    del self._audio_unsaved[item_id]
            if self._state_unsaved:
                self._state_unsaved = False
                try:
                    await self.store.put_json(STATE_KIND, self.id,
                                              {"items": self.items, "session": self.session},
                                              ttl_s=self.ttl_s)
                except StoreUnavailableError:
                    self._state_unsaved = True
                    raise
        except StoreUnavailableError as exc:
            log.warning("conversation %s kept in memory until the store answers: %s",
                        self.id, exc.message)
            if self.on_unsaved is not None:
                self.on_unsaved()
            return False
        return True

    async def audio(self, item_id: str) -> bytes | None:
        if item_id in self._audio_unsaved:
            return self._audio_unsaved[item_id]
        return await self.store.get_blob(AUDIO_KIND, item_id)

    # -- items ----------------------------------------------------------------------------

    def get(self, item_id: str, *, event_id: str | None = None,
            param: str = "item_id") -> dict[str, Any]:
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise RealtimeError(f"Item with item_id not found: {item_id}", code="item_not_found",
                            param=param, event_id=event_id)

    def previous_id(self, item_id: str) -> str | None:
        ids = [item["id"] for item in self.items]
        at = ids.index(item_id)
        return ids[at - 1] if at > 0 else None

    async def add(self, item: dict[str, Any], previous_item_id: str | None = None,
                  *, event_id: str | None = None) -> str | None:
        """Insert after `previous_item_id` ("root": first; None: last); returns the id of
        the item before it."""
        if any(existing["id"] == item["id"] for existing in self.items):
            raise RealtimeError(f"an item with id {item['id']!r} already exists",
                                code="duplicate_item_id", param="item.id", event_id=event_id)
        if previous_item_id is None:
            self.items.append(item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            at = self.items.index(self.get(previous_item_id, event_id=event_id,
                                           param="previous_item_id"))
            self.items.insert(at + 1, item)
        await self.save()
        return self.previous_id(item["id"])

    async def delete(self, item_id: str, *, event_id: str | None = None) -> None:
        self.items.remove(self.get(item_id, event_id=event_id))
        await self.save()
        await self.store.delete(AUDIO_KIND, item_id)

    # -- what the model reads -------------------------------------------------------------

    def messages(self, instructions: str) -> list[dict[str, Any]]:
        """The conversation as chat messages (see `as_messages`)."""
        return as_messages(instructions, self.items)


def as_messages(instructions: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as chat messages: instructions first, function calls and their outputs as
    assistant tool calls and tool messages."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
    for item in items:
        kind = item.get("type")
        if kind == "message":
            text = item_text(item)
            if text:
                out.append({"role": item["role"] if item["role"] != "system" else "system",
                            "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out[-1].get("role") == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": item.get("output") or ""})
    return out


def item_text(item: dict[str, Any]) -> str:
    """The words of a message item: its text parts and the transcripts of its audio."""
    words = []
    for part in item.get("content") or []:
        text = part.get("text") if part.get("type") in ("input_text", "output_text", "text") \
            else part.get("transcript")
        if text:
            words.append(text)
    return " ".join(words)


def truncate_transcript(text: str, kept_ms: int, total_ms: int) -> str:
    """The words of `text` heard in the first `kept_ms` of `total_ms` of speech, assuming
    an even pace (Parley's TTS speaks at a steady rate, clause by clause)."""
    if total_ms <= 0 or kept_ms >= total_ms:
        return text
    words = text.split()
    return " ".join(words[: round(len(words) * max(kept_ms, 0) / total_ms)])

