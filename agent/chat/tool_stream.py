"""A reply generated under the tool grammar, split as it streams: text, or tool calls.

The grammar (agent/decoder/grammar.py) fixes the shape, so the split is exact: a reply
that starts with "<" (tagged calls) or "{" (one bare JSON call) is calls, anything else is
text. Calls come out as OpenAI streams
them: first the call's id and name with empty arguments, then argument fragments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from agent.decoder.grammar import CALL_CLOSE, CALL_OPEN

_HEAD_END = '"arguments": '
_TAIL = "}\n" + CALL_CLOSE  # what closes a call after its arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class CallFragment:
    index: int               # which call of this reply
    id: str | None           # set on a call's first fragment only
    name: str | None         # likewise
    arguments: str


class ToolStream:
    def __init__(self) -> None:
        self.mode: str | None = None  # "text" | "calls" once the first byte is known
        self.buffer = ""
        self.calls: list[tuple[str, str]] = []  # (id, name) of calls started
        self.sent = -1  # of the current call's arguments, characters sent (-1: none open)
        self.bodies: list[tuple[str, str]] = []  # (name, arguments) of complete calls
        self.bare = False  # the reply is one bare JSON call object (see grammar._lark)

    def finish(self) -> list[CallFragment]:
        """Fragments still held when the reply ends: a bare call has no closing tag, so
        its last characters wait for one."""
        return self.push(f"\n{CALL_CLOSE}")[1] if self.bare else []

    def push(self, text: str) -> tuple[str, list[CallFragment]]:
        """(text to show, call fragments) for the next piece of output. The first call
        streams as it is written; later ones come whole, and a repeat is dropped."""
        if self.mode is None and text:
            first = text.lstrip(" ")[:1]
            self.mode = "calls" if first in ("<", "{") else "text"
            if first == "{":  # a bare JSON call: read it as the tagged form
                self.bare = True
                self.buffer = f"{CALL_OPEN}\n"
        if self.mode != "calls":
            return text, []
        self.buffer += text
        out: list[CallFragment] = []
        while True:
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                return "", out
            call = self.buffer[start:]
            head_end = call.find(_HEAD_END)
            if head_end < 0:
                return "", out
            args_at = head_end + len(_HEAD_END)
            args = call[args_at:]
            end = args.find(_TAIL)
            is_first = not self.calls
            if not is_first and self.sent < 0 and end < 0:
                return "", out  # a later call is held until whole: it may be a repeat
            if self.sent < 0 or is_first:
                head = call[len(CALL_OPEN):head_end].strip().removeprefix("{")
                name = json.loads(head.rstrip().rstrip(",").split(":", 1)[1])
                body = (name, args[:end] if end >= 0 else None)
                if body in self.bodies:  # a repeat: the grammar ends the reply after it
                    self.buffer = call[args_at + end + len(_TAIL):]
                    continue
                self.calls.append((new_call_id(), name))
                self.sent = 0
                out.append(CallFragment(len(self.calls) - 1, self.calls[-1][0], name, ""))
            ready = args[:end] if end >= 0 else args[:max(0, len(args) - len(_TAIL))]
            if len(ready) > self.sent:
                out.append(CallFragment(len(self.calls) - 1, None, None, ready[self.sent:]))
                self.sent = len(ready)
            if end < 0:
                return "", out
            # The call is complete: drop it and look for the next one.
            self.bodies.append((self.calls[-1][1], args[:end]))
            self.buffer = call[args_at + end + len(_TAIL):]
            self.sent = -1
