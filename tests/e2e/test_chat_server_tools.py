"""Server-side tools in chat (`parley.execute_tools`), through the official SDK: Parley runs
the call with its own backends and the model answers from the result."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY

MODEL = "gpt-4o-audio-preview"
REFUND = [{"role": "user", "content": "How long does a refund take to arrive?"}]


def _force(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_search_runs_on_the_server_and_the_model_answers(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=REFUND, temperature=0, max_completion_tokens=120,
        parallel_tool_calls=False, tool_choice=_force("search_knowledge_base"),
        extra_body={"parley": {"execute_tools": True}})
    choice = reply.choices[0]
    # The client gets words, not a call: the server ran it.
    assert choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and choice.message.content.strip()
    added = reply.model_extra["parley"]["tool_messages"]
    call = added[0]["tool_calls"][0]
    assert added[0]["role"] == "assistant" and call["function"]["name"] == "search_knowledge_base"
    result = added[1]
    assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
    output = json.loads(result["content"])
    assert output["query"] == json.loads(call["function"]["arguments"])["query"]
    for hit in output["results"]:  # real search results carry their sources
        assert hit["source"] and hit["snippet"]
    # Usage counts every round the model ran.
    assert reply.usage.prompt_tokens > 2 * 40


def test_streamed_reply_hides_server_calls_and_reports_them_at_the_end(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=REFUND, temperature=0, max_completion_tokens=120, stream=True,
        parallel_tool_calls=False, tool_choice=_force("search_knowledge_base"),
        extra_body={"parley": {"execute_tools": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    added = last.model_extra["parley"]["tool_messages"]
    assert added[0]["tool_calls"][0]["function"]["name"] == "search_knowledge_base"


def test_payment_waits_for_the_users_explicit_confirmation(client):
    ask = [{"role": "user", "content": "Please take a payment of 25 EUR for the deposit."}]
    options = dict(model=MODEL, temperature=0, max_completion_tokens=160,
                   tool_choice=_force("create_payment"), parallel_tool_calls=False,
                   extra_body={"parley": {"execute_tools": True}})
    first = client.chat.completions.create(messages=ask, **options)
    assert "parley" in first.model_extra, first
    added = first.model_extra["parley"]["tool_messages"]
    outcome = json.loads(added[1]["content"])
    assert outcome["status"] == "needs_confirmation"  # nothing was charged yet
    history = [*ask, *added, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Yes, go ahead."}]
    second = client.chat.completions.create(messages=history, **options)
    ran = json.loads(second.model_extra["parley"]["tool_messages"][1]["content"])
    assert ran.get("status") != "needs_confirmation"
    # Charged now (the model's amount may be one the ledger refuses: then a clear error).
    assert (ran.get("status") == "succeeded" and ran["payment_id"].startswith("pay_")) \
        or "error" in ran


def test_a_refusal_does_not_confirm(client):
    ask = [{"role": "user", "content": "Please take a payment of 25 EUR for the deposit."}]
    options = dict(model=MODEL, temperature=0, max_completion_tokens=160,
                   tool_choice=_force("create_payment"), parallel_tool_calls=False,
                   extra_body={"parley": {"execute_tools": True}})
    first = client.chat.completions.create(messages=ask, **options)
    added = first.model_extra["parley"]["tool_messages"]
    history = [*ask, *added, {"role": "assistant", "content": "Shall I charge 25 EUR?"},
               {"role": "user", "content": "No, don't do that."}]
    second = client.chat.completions.create(messages=history, **options)
    again = json.loads(second.model_extra["parley"]["tool_messages"][1]["content"])
    assert again["status"] == "needs_confirmation"


def test_client_tools_still_come_back_to_the_client(client):
    lookup = {"type": "function", "function": {
        "name": "lookup_order", "description": "Find an order by its number.",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}},
                       "required": ["order"]}}}
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_completion_tokens=80, tools=[lookup],
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": "Where is my order A-1001?"}],
        tool_choice=_force("lookup_order"), extra_body={"parley": {"execute_tools": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["lookup_order"]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {
        "name": "search_knowledge_base", "parameters": {"type": "object"}}}]}, "tools"),
])
def test_bad_server_tool_requests_get_openai_errors(server, extra, param):
    body = {"model": MODEL, "messages": REFUND, "parley": {"execute_tools": True}, **extra}
    reply = httpx.post(server + "/v1/chat/completions", json=body, timeout=60,
                       headers={"authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_without_the_option_no_server_tool_is_offered(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=REFUND,
                                       tool_choice=_force("search_knowledge_base"))
