"""Did the user's latest turn explicitly confirm the action the assistant asked about?

A non-idempotent tool (a payment, a refund) first answers `needs_confirmation` and runs
only when called again after the user said yes. "Said yes" is decided here, by words and
not by the model, so a model that calls the tool twice in a row cannot confirm for the
user: the user's own latest turn must be an affirmation with no refusal in it, and it
must come after the tool asked for confirmation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from agent.dispatch.types import ErrorCode

_AFFIRM = re.compile(
    r"\b(yes|yeah|yep|yup|sure|confirm|confirmed|i confirm|go ahead|do it|proceed|"
    r"please do|that's right|that is right|correct|ok|okay|approved?)\b")
_REFUSE = re.compile(
    r"\b(no|nope|not|don't|do not|dont|cancel|stop|wait|hold on|never|wrong|"
    r"change|instead)\b")


def is_affirmation(text: str) -> bool:
    """'Yes, go ahead' is; 'yes but not now', 'no', 'wait' and questions are not."""
    words = text.lower().replace("’", "'").strip()
    if not words or words.endswith("?"):
        return False
    return bool(_AFFIRM.search(words)) and not _REFUSE.search(words)


def confirmed_in_chat(messages: Sequence[dict[str, Any]]) -> bool:
    """For Chat Completions: the last message is the user's affirmation, and since the
    user's previous turn a tool result asked for confirmation."""
    if not messages or messages[-1].get("role") != "user":
        return False
    if not is_affirmation(message_text(messages[-1])):
        return False
    for message in reversed(messages[:-1]):
        if message.get("role") == "user":
            return False
        if message.get("role") == "tool" and asks_confirmation(message_text(message)):
            return True
    return False


def asks_confirmation(tool_output: str) -> bool:
    """Whether a tool result (its JSON text) is the dispatcher's confirmation request."""
    try:
        body = json.loads(tool_output)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == ErrorCode.NEEDS_CONFIRMATION


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text") or "") for part in content
                        if isinstance(part, dict) and part.get("type") in ("text", "input_text"))
    return ""
