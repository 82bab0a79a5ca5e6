"""Call records in the state store: the idempotency claim and the recorded result.

One key per call id, `parley:tool_call:<id>`, holding a JSON document. The first executor
creates it with SET NX in state "running" (so a second executor, on any replica, sees the
claim and waits); when the backend returns, the same key is overwritten in state "done"
with the result. A "running" record carries a deadline: if it passes without a result, the
runner died mid-call, and the outcome is reported as in doubt rather than run again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.dispatch.types import CallContext, ToolCall, ToolResult
from agent.state.store import Store

KIND = "tool_call"
RUNNING = "running"
DONE = "done"
# Time for a finished runner to write its result, on top of the tool's timeout.
DEADLINE_GRACE_S = 5.0


class CallRecords:
    def __init__(self, store: Store, ttl_s: float = 7 * 24 * 3600):
        self.store = store
        self.ttl_s = ttl_s

    async def get(self, call_id: str) -> dict[str, Any] | None:
        return await self.store.get_json(KIND, call_id)

    async def claim(self, call: ToolCall, context: CallContext,
                    timeout_s: float) -> dict[str, Any] | None:
        """None when this caller now owns the call; else the record that was there."""
        now = time.time()
        record = _base(call, context) | {
            "status": RUNNING, "started_at": now,
            "deadline": now + timeout_s + DEADLINE_GRACE_S}
        for _ in range(5):
            created = await self.store.put_json_if_absent(KIND, call.id, record,
                                                          ttl_s=self.ttl_s)
            if created:
                return None
            existing = await self.get(call.id)
            if existing is not None:
                return existing
            # The record expired between our SET and GET: try again.
        raise RuntimeError(f"the record of call {call.id} keeps vanishing")

    async def finish(self, call: ToolCall, context: CallContext, result: ToolResult) -> None:
        record = _base(call, context) | {
            "status": DONE, "finished_at": time.time(), "result": result.to_json()}
        await self.store.put_json(KIND, call.id, record, ttl_s=self.ttl_s)

    async def record_once(self, call: ToolCall, context: CallContext,
                          result: ToolResult) -> None:
        """Record a result that needed no execution, unless the id is already taken."""
        record = _base(call, context) | {
            "status": DONE, "finished_at": time.time(), "result": result.to_json()}
        await self.store.put_json_if_absent(KIND, call.id, record, ttl_s=self.ttl_s)

    async def wait_done(self, call_id: str) -> dict[str, Any] | None:
        """The record once done; still running if its deadline passed; None if it vanished."""
        delay = 0.01
        while True:
            record = await self.get(call_id)
            if record is None or record.get("status") == DONE:
                return record
            if time.time() > float(record.get("deadline", 0)):
                return record
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


def _base(call: ToolCall, context: CallContext) -> dict[str, Any]:
    return {"call": {"id": call.id, "name": call.name, "arguments": call.arguments},
            "fingerprint": call.fingerprint(), "session_id": context.session_id,
            "key": context.key_id}
