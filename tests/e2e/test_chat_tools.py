"""Tool calls through the official `openai` SDK: OpenAI's client-side flow, end to end."""

from __future__ import annotations

import json

import jsonschema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris, in celsius?"}]


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    return arguments


def test_required_tool_call_then_tool_result(client):
    reply = client.chat.completions.create(
        model="gpt-4o-audio-preview", messages=ASK, tools=[WEATHER], tool_choice="required",
        temperature=0, max_completion_tokens=100)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) >= 1
    for call in choice.message.tool_calls:
        _valid_call(call)
    call = choice.message.tool_calls[0]
    follow = client.chat.completions.create(
        model="gpt-4o-audio-preview", tools=[WEATHER], temperature=0,
        max_completion_tokens=40, tool_choice="none",
        messages=[*ASK, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id,
                   "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}])
    answer = follow.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.tool_calls is None
    assert answer.message.content and answer.message.content.strip()


def test_named_tool_choice_streams_openai_deltas(client):
    stream = client.chat.completions.create(
        model="gpt-4o-audio-preview", messages=ASK, tools=[WEATHER], temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, max_completion_tokens=60, stream=True)
    firsts, fragments, finish = [], {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    firsts.append(delta)
                    assert delta.function.arguments == ""
                fragments[delta.index] = fragments.get(delta.index, "") + \
                    (delta.function.arguments or "")
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert len(firsts) == 1 and firsts[0].type == "function"
    assert firsts[0].function.name == "get_weather" and firsts[0].id.startswith("call_")
    jsonschema.validate(json.loads(fragments[0]), WEATHER["function"]["parameters"])


def test_legacy_functions_answer_function_call(client):
    reply = client.chat.completions.create(
        model="gpt-4o-audio-preview", messages=ASK, functions=[WEATHER["function"]],
        function_call={"name": "get_weather"}, temperature=0, max_completion_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments),
                        WEATHER["function"]["parameters"])
