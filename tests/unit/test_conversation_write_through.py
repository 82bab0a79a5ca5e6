"""A conversation whose store goes away (Redis restarting) keeps its changes and writes
them through once the store answers again (agent.realtime.conversation)."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from agent.errors import StoreUnavailableError
from agent.realtime.conversation import AUDIO_KIND, STATE_KIND, Conversation
from agent.state.store import Store


class FlakyStore:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Any] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("the state store is unavailable (test): refused")

    async def put_json(self, kind: str, key: str, value: Any, ttl_s: float | None = None):
        self._check()
        self.data[kind, key] = json.loads(json.dumps(value))

    async def get_json(self, kind: str, key: str) -> Any:
        self._check()
        return self.data.get((kind, key))

    async def put_blob(self, kind: str, key: str, value: bytes, ttl_s: float | None = None):
        self._check()
        self.data[kind, key] = value

    async def get_blob(self, kind: str, key: str) -> bytes | None:
        self._check()
        return self.data.get((kind, key))


def _item(ident: str) -> dict[str, Any]:
    return {"id": ident, "object": "realtime.item", "type": "message", "role": "user",
            "status": "completed", "content": [{"type": "input_text", "text": ident}]}


async def test_changes_wait_in_memory_and_go_through_when_the_store_is_back():
    store = FlakyStore()
    conversation = Conversation("conv_1", cast(Store, store), ttl_s=60)
    calls: list[str] = []
    conversation.on_unsaved = lambda: calls.append("retry")
    await conversation.add(_item("item_a"))
    await conversation.save()
    assert store.data[STATE_KIND, "conv_1"]["items"][0]["id"] == "item_a"

    store.down = True
    await conversation.add(_item("item_b"))
    await conversation.save()                         # no error: the session goes on
    await conversation.save_audio("item_b", b"\x01\x02")
    assert conversation.unsaved and calls
    assert await conversation.audio("item_b") == b"\x01\x02"   # served from memory
    assert not await conversation.flush()             # still down
    with pytest.raises(StoreUnavailableError):
        await conversation.audio("item_a")            # what only the store has: a 503

    store.down = False
    assert await conversation.flush()
    assert not conversation.unsaved
    assert [i["id"] for i in store.data[STATE_KIND, "conv_1"]["items"]] == ["item_a", "item_b"]
    assert store.data[AUDIO_KIND, "item_b"] == b"\x01\x02"
    resumed = await Conversation.resume("conv_1", cast(Store, store), ttl_s=60)
    assert [i["id"] for i in resumed.items] == ["item_a", "item_b"]


async def test_audio_saved_again_while_down_keeps_the_newest():
    store = FlakyStore()
    conversation = Conversation("conv_2", cast(Store, store), ttl_s=60)
    store.down = True
    await conversation.save_audio("item_x", b"full answer")
    await conversation.save_audio("item_x", b"full")     # truncated while down
    store.down = False
    assert await conversation.flush()
    assert store.data[AUDIO_KIND, "item_x"] == b"full"
