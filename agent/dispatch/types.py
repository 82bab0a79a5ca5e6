"""The data that crosses the dispatcher: a call in, a result out, and who is asking.

These are flat, frozen records. A backend never sees a ToolCall: it gets the validated
arguments and the CallContext, and either returns a JSON object or raises ToolError.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ParleyError


class SideEffect(enum.StrEnum):
    """What running a tool does to the world; it decides retries and confirmation."""

    READ_ONLY = "read_only"                         # safe to repeat
    IDEMPOTENT_WRITE = "idempotent_write"           # repeating it leaves the same state
    NON_IDEMPOTENT_WRITE = "non_idempotent_write"   # each run acts again (money moves)


@dataclass(frozen=True)
class ToolCall:
    """A function call the model emitted: `arguments` is the JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def fingerprint(self) -> str:
        """Same name and same arguments (whitespace and key order aside) -> same print."""
        try:
            canonical = json.dumps(json.loads(self.arguments), sort_keys=True,
                                   separators=(",", ":"))
        except ValueError:
            canonical = self.arguments
        return hashlib.sha256(f"{self.name}\n{canonical}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CallContext:
    """Who asks. The session layer fills it; `confirmed` means the user's latest turn
    explicitly confirmed this action (required for non-idempotent writes)."""

    session_id: str
    api_key: str | None = None
    confirmed: bool = False
    # The session's own tool list (e.g. what the client enabled); None = no restriction.
    allowed_tools: frozenset[str] | None = None
    # Filled by the dispatcher before a backend runs, so a backend can derive keys from it.
    call_id: str = ""
    # On a phone call: the keypad digits that were the user's latest turn, if it was one
    # (an account number, a menu choice); None otherwise.
    keypad: str | None = None

    @property
    def key_id(self) -> str:
        """A stable, non-secret name for the API key, safe for logs and ledgers."""
        return key_fingerprint(self.api_key)


def key_fingerprint(api_key: str | None) -> str:
    if not api_key:
        return "anonymous"
    return "key_" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class ErrorCode(enum.StrEnum):
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    PERMISSION_DENIED = "permission_denied"
    NEEDS_CONFIRMATION = "needs_confirmation"
    TIMEOUT = "timeout"
    TOOL_ERROR = "tool_error"            # the backend refused: a domain error (slot taken)
    BACKEND_FAILURE = "backend_failure"  # the backend broke: an exception, a bad reply
    CALL_ID_REUSED = "call_id_reused"
    IN_DOUBT = "in_doubt"                # an earlier run of this id never reported back
    STORE_UNAVAILABLE = "store_unavailable"  # the state store failed: nothing was run


class ToolError(ParleyError):
    """Raised by a backend for an outcome the model should explain to the user.

    `details` is extra JSON the model may use (alternatives, limits left, ...). The
    dispatcher turns it into a failed ToolResult; should one ever reach a client, it is a
    typed error like any other.
    """

    code: str

    def __init__(self, message: str, *, code: str = ErrorCode.TOOL_ERROR,
                 details: dict[str, Any] | None = None):
        super().__init__(message, code=str(code))
        self.details = details or {}


@dataclass(frozen=True)
class ToolResult:
    """What a call produced. `output` is always a JSON object the model can read: the
    backend's answer when ok, else {"error": {"code", "message", ...details}}."""

    call_id: str
    name: str
    ok: bool
    output: dict[str, Any]
    error: str | None = None
    duration_ms: float = 0.0
    code: str | None = None
    # True when this result was recorded earlier and returned again, not executed now.
    replayed: bool = field(default=False, compare=False)

    @classmethod
    def failure(cls, call: ToolCall, code: str, message: str,
                details: dict[str, Any] | None = None, duration_ms: float = 0.0,
                output: dict[str, Any] | None = None) -> ToolResult:
        body = output if output is not None else \
            {"error": {"code": str(code), "message": message, **(details or {})}}
        return cls(call.id, call.name, False, body, message, duration_ms, str(code))

    def to_json(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "name": self.name, "ok": self.ok,
                "output": self.output, "error": self.error,
                "duration_ms": self.duration_ms, "code": self.code}

    @classmethod
    def from_json(cls, data: dict[str, Any], replayed: bool = False) -> ToolResult:
        return cls(data["call_id"], data["name"], bool(data["ok"]), dict(data["output"]),
                   data.get("error"), float(data.get("duration_ms") or 0.0),
                   data.get("code"), replayed)
