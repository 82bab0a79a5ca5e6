"""Only the user's own explicit yes, after the tool asked, confirms a payment."""

from __future__ import annotations

import json

import pytest

from agent.dispatch.confirmation import confirmed_in_chat, is_affirmation

ASKED = {"role": "tool", "tool_call_id": "call_1",
         "content": json.dumps({"status": "needs_confirmation", "message": "confirm?"})}


@pytest.mark.parametrize("text", ["Yes", "yes, go ahead.", "Sure, do it", "I confirm",
                                  "OK", "That's right, proceed"])
def test_affirmations(text):
    assert is_affirmation(text)


@pytest.mark.parametrize("text", ["", "No", "yes but not now", "wait", "Is that right?",
                                  "don't", "cancel it", "Yes, but change the amount",
                                  "Tell me more about refunds"])
def test_not_affirmations(text):
    assert not is_affirmation(text)


def test_confirmed_only_after_the_tool_asked_and_since_the_last_user_turn():
    ask = {"role": "user", "content": "pay 20 EUR"}
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}
    said = {"role": "assistant", "content": "Shall I charge 20 EUR?"}
    yes = {"role": "user", "content": [{"type": "text", "text": "Yes please do"}]}
    assert confirmed_in_chat([ask, call, ASKED, said, yes])
    # A yes with no pending confirmation request confirms nothing.
    assert not confirmed_in_chat([ask, said, yes])
    # The request was answered by an earlier user turn: a later yes is about something else.
    other = {"role": "user", "content": "what about refunds?"}
    assert not confirmed_in_chat([ask, call, ASKED, other, said, yes])
    # The last word must be the user's.
    assert not confirmed_in_chat([ask, call, ASKED, said])
