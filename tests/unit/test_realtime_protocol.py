"""Realtime protocol: client events parsed and checked, beta translated, server events shaped.

The official SDK's own event types (openai 3.x, GA and beta) are the reference the examples
and the outputs are checked against, besides Parley's JSON Schemas.
"""

from __future__ import annotations

import base64
import copy
import json
import re

import jsonschema
import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.beta.realtime import realtime_client_event as beta_client
from openai.types.beta.realtime import realtime_server_event as beta_server
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent

from agent.config import Settings
from agent.dispatch import load_tool_schema
from agent.realtime import protocol
from agent.realtime.protocol import (
    RealtimeError,
    parse_client_event,
    server_event,
    to_client,
    validate_server_event,
)
from agent.realtime.session_config import (
    apply_update,
    default_session,
    to_response_object,
    to_session_object,
)
from tests.unit.audio_signals import speech_like

GA_CLIENT = pydantic.TypeAdapter(RealtimeClientEvent)
GA_SERVER = pydantic.TypeAdapter(RealtimeServerEvent)
BETA_CLIENT = pydantic.TypeAdapter(beta_client.RealtimeClientEvent)
BETA_SERVER = pydantic.TypeAdapter(beta_server.RealtimeServerEvent)

PCM = (speech_like(24000, 0.2) * 32767).astype("<i2").tobytes()
AUDIO_B64 = base64.b64encode(PCM).decode()
TOOL = {"type": "function", "name": "check_availability", "description": "Free tables on a day.",
        "parameters": load_tool_schema("check_availability")}
VAD = {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
       "silence_duration_ms": 700, "create_response": True, "interrupt_response": False}
TRANSCRIPTION = {"model": "whisper-1", "language": "en", "prompt": "table booking"}

GA_SESSION = {
    "type": "realtime", "model": "gpt-realtime", "instructions": "Be brief.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {"format": {"type": "audio/pcmu"}, "transcription": TRANSCRIPTION,
                  "noise_reduction": {"type": "near_field"}, "turn_detection": VAD},
        "output": {"format": {"type": "audio/pcma"}, "voice": "ash", "speed": 1.25},
    },
    "tools": [TOOL], "tool_choice": "auto", "max_output_tokens": 300,
}
BETA_SESSION = {
    "model": "gpt-4o-realtime-preview", "instructions": "Be brief.",
    "modalities": ["text", "audio"], "input_audio_format": "g711_ulaw",
    "output_audio_format": "g711_alaw", "voice": "ash", "speed": 1.25,
    "input_audio_transcription": TRANSCRIPTION,
    "input_audio_noise_reduction": {"type": "near_field"},
    "turn_detection": VAD, "tools": [TOOL], "tool_choice": "auto",
    "max_response_output_tokens": 300,
}
# The same session, as the beta translation renders it (its `model` is its own).
BETA_AS_GA = {**GA_SESSION, "model": "gpt-4o-realtime-preview"}

USER_AUDIO = {"type": "message", "role": "user",
              "content": [{"type": "input_audio", "audio": AUDIO_B64},
                          {"type": "input_text", "text": "for two, please"}]}

# One GA client event of every type, as the official SDK would send it.
GA_EVENTS = {
    "session.update": {"type": "session.update", "event_id": "evt_1", "session": GA_SESSION},
    "input_audio_buffer.append": {"type": "input_audio_buffer.append", "audio": AUDIO_B64},
    "input_audio_buffer.commit": {"type": "input_audio_buffer.commit", "event_id": "evt_2"},
    "input_audio_buffer.clear": {"type": "input_audio_buffer.clear"},
    "conversation.item.create": {"type": "conversation.item.create", "previous_item_id": "root",
                                 "item": USER_AUDIO},
    "conversation.item.retrieve": {"type": "conversation.item.retrieve", "item_id": "item_1"},
    "conversation.item.delete": {"type": "conversation.item.delete", "item_id": "item_1"},
    "conversation.item.truncate": {"type": "conversation.item.truncate", "item_id": "item_2",
                                   "content_index": 0, "audio_end_ms": 1530},
    "response.create": {"type": "response.create", "response": {
        "output_modalities": ["text"], "instructions": "Answer in one word.",
        "audio": {"output": {"voice": "ash", "format": {"type": "audio/pcmu"}}},
        "max_output_tokens": "inf",
        "tool_choice": {"type": "function", "name": "check_availability"}, "tools": [TOOL],
        "conversation": "none", "metadata": {"topic": "booking"},
        "input": [{"type": "item_reference", "id": "item_1"},
                  {"type": "message", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Which day?"}]}]}},
    "response.cancel": {"type": "response.cancel", "response_id": "resp_1"},
    "output_audio_buffer.clear": {"type": "output_audio_buffer.clear"},
}

# Beta client events and the GA events they mean. Events whose shape did not change are
# the GA ones.
BETA_EVENTS = {
    "session.update": (
        {"type": "session.update", "event_id": "evt_1", "session": BETA_SESSION},
        {"type": "session.update", "event_id": "evt_1", "session": BETA_AS_GA}),
    "conversation.item.create": (
        {"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": "Which day?"},
                        {"type": "audio", "transcript": "Which day?"}]}},
        {"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "Which day?"},
                        {"type": "output_audio", "transcript": "Which day?"}]}}),
    "response.create": (
        {"type": "response.create", "response": {
            "modalities": ["text"], "instructions": "Answer in one word.", "voice": "ash",
            "output_audio_format": "g711_ulaw", "max_response_output_tokens": "inf",
            "tool_choice": "check_availability", "tools": [TOOL], "conversation": "none",
            "metadata": {"topic": "booking"}, "temperature": 0.8,
            "input": [{"type": "item_reference", "id": "item_1"},
                      {"type": "message", "role": "assistant",
                       "content": [{"type": "text", "text": "Which day?"}]}]}},
        {"type": "response.create", "response": {
            **GA_EVENTS["response.create"]["response"], "temperature": 0.8}}),
}


def _wire(event: dict) -> str:
    return json.dumps(event)


def _sdk_typed(event: dict) -> dict:
    """The event as the SDK's pydantic client-event models can check it: they have no
    model for item references in response.input (the SDK types those as a TypedDict)."""
    response = event.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("input"), list):
        return event
    kept = [i for i in response["input"] if i.get("type") != "item_reference"]
    return {**event, "response": {**response, "input": kept}}


def _error(raw: str | bytes | dict, *, beta: bool = False) -> RealtimeError:
    with pytest.raises(RealtimeError) as caught:
        parse_client_event(_wire(raw) if isinstance(raw, dict) else raw, beta=beta)
    return caught.value


# --- client events: GA and beta -----------------------------------------------------------

def test_every_client_event_type_has_an_example():
    assert set(GA_EVENTS) == set(protocol.client_event_types())


@pytest.mark.parametrize("event_type", sorted(GA_EVENTS))
def test_ga_events_come_through_unchanged(event_type):
    event = GA_EVENTS[event_type]
    GA_CLIENT.validate_python(_sdk_typed(event))     # the example is what the SDK sends
    assert parse_client_event(_wire(event), beta=False) == event
    assert parse_client_event(_wire(event).encode(), beta=False) == event


@pytest.mark.parametrize("event_type", sorted(GA_EVENTS))
def test_beta_events_become_their_ga_equivalent(event_type):
    beta, ga = BETA_EVENTS.get(event_type, (GA_EVENTS[event_type], GA_EVENTS[event_type]))
    BETA_CLIENT.validate_python(beta)            # the example is what a beta client sent
    assert parse_client_event(_wire(beta), beta=True) == ga


def test_beta_session_update_configures_the_same_session_as_ga():
    config = default_session(Settings(), "gpt-realtime")
    beta = parse_client_event(_wire(BETA_EVENTS["session.update"][0]), beta=True)["session"]
    ga = parse_client_event(_wire(GA_EVENTS["session.update"]), beta=False)["session"]
    assert apply_update(config, beta) == apply_update(config, ga)
    assert apply_update(config, ga) != config


@pytest.mark.parametrize(("beta", "ga"), [
    ("pcm16", {"type": "audio/pcm", "rate": 24000}),
    ("g711_ulaw", {"type": "audio/pcmu"}),
    ("g711_alaw", {"type": "audio/pcma"}),
    ("opus", {"type": "audio/opus"}),
])
def test_beta_audio_formats(beta, ga):
    event = {"type": "session.update", "session": {"input_audio_format": beta}}
    assert parse_client_event(_wire(event), beta=True)["session"]["audio"]["input"]["format"] == ga


@pytest.mark.parametrize(("modalities", "ga"), [
    (["text", "audio"], ["audio"]), (["audio", "text"], ["audio"]), (["text"], ["text"])])
def test_beta_modalities(modalities, ga):
    event = {"type": "session.update", "session": {"modalities": modalities}}
    assert parse_client_event(_wire(event), beta=True)["session"]["output_modalities"] == ga


def test_beta_turn_detection_keeps_only_its_kinds_fields():
    flat = {"type": "semantic_vad", "eagerness": "high", "threshold": 0.5,
            "silence_duration_ms": 500, "create_response": True}
    event = {"type": "session.update", "session": {"turn_detection": flat}}
    got = parse_client_event(_wire(event), beta=True)["session"]["audio"]["input"]
    assert got["turn_detection"] == {"type": "semantic_vad", "eagerness": "high",
                                     "create_response": True}
    untyped = {"type": "session.update", "session": {"turn_detection": {"threshold": 0.3}}}
    got = parse_client_event(_wire(untyped), beta=True)["session"]["audio"]["input"]
    assert got["turn_detection"] == {"type": "server_vad", "threshold": 0.3}


def test_parley_extensions_are_accepted():
    session = {"type": "realtime", "temperature": 0.3,
               "audio": {"input": {"format": {"type": "audio/opus"}},
                         "output": {"speed": 4.0}},
               "parley": {"server_tools": True, "backchannel_ms": 800, "debug_events": True}}
    event = {"type": "session.update", "session": session}
    assert parse_client_event(_wire(event), beta=False) == event


def test_session_object_sent_back_is_a_valid_update():
    config = default_session(Settings(), "gpt-realtime")
    echoed = to_session_object(config, session_id="sess_1", beta=False, expires_at=1)
    event = {"type": "session.update", "session": echoed}
    assert apply_update(config, parse_client_event(_wire(event), beta=False)["session"]) == config


# --- malformed events ---------------------------------------------------------------------

def _update(**session) -> dict:
    return {"type": "session.update", "event_id": "evt_bad", "session": {"type": "realtime",
                                                                        **session}}


@pytest.mark.parametrize(("event", "code", "param"), [
    (_update(audio={"output": {"speed": 4.5}}), "invalid_value", "session.audio.output.speed"),
    (_update(audio={"output": {"speed": "fast"}}), "invalid_type", "session.audio.output.speed"),
    (_update(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}}),
     "invalid_value", "session.audio.input.format.rate"),
    (_update(audio={"input": {"format": {"type": "audio/wav"}}}),
     "invalid_value", "session.audio.input.format.type"),
    (_update(audio={"output": {"format": {"type": "audio/opus"}}}),
     "invalid_value", "session.audio.output.format.type"),
    (_update(voice="alloy"), "unknown_parameter", "session.voice"),
    (_update(output_modalities=["text", "audio"]), "invalid_value", "session.output_modalities"),
    (_update(max_output_tokens=0), "invalid_value", "session.max_output_tokens"),
    (_update(temperature=2.5), "invalid_value", "session.temperature"),
    (_update(tool_choice="sometimes"), "invalid_value", "session.tool_choice"),
    (_update(tools=[{"type": "function"}]), "missing_required_parameter", "session.tools[0].name"),
    (_update(tools=[{"type": "mcp", "server_label": "x"}]), "unsupported_parameter",
     "session.tools[0]"),
    (_update(prompt={"id": "pmpt_1"}), "unsupported_parameter", "session.prompt"),
    (_update(audio={"input": {"turn_detection": {"type": "server_vad", "eagerness": "low"}}}),
     "unknown_parameter", "session.audio.input.turn_detection.eagerness"),
    (_update(audio={"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}),
     "invalid_value", "session.audio.input.turn_detection.threshold"),
    (_update(parley={"backchannel_ms": -1}), "invalid_value", "session.parley.backchannel_ms"),
    (_update(parley={"verbose": True}), "unknown_parameter", "session.parley.verbose"),
    ({"type": "session.update", "event_id": "evt_bad", "session": {}},
     "missing_required_parameter", "session.type"),
    ({"type": "session.update", "event_id": "evt_bad", "session": {"type": "transcription"}},
     "invalid_value", "session.type"),
    ({"type": "session.update", "event_id": "evt_bad"}, "missing_required_parameter", "session"),
    ({"type": "input_audio_buffer.append", "event_id": "evt_bad"},
     "missing_required_parameter", "audio"),
    ({"type": "input_audio_buffer.append", "event_id": "evt_bad", "audio": 12},
     "invalid_type", "audio"),
    ({"type": "input_audio_buffer.commit", "event_id": "evt_bad", "audio": "AAAA"},
     "unknown_parameter", "audio"),
    ({"type": "conversation.item.truncate", "event_id": "evt_bad", "item_id": "item_1",
      "content_index": 0, "audio_end_ms": 1530.5}, "invalid_type", "audio_end_ms"),
    ({"type": "conversation.item.truncate", "event_id": "evt_bad", "item_id": "item_1",
      "audio_end_ms": 10}, "missing_required_parameter", "content_index"),
    ({"type": "conversation.item.create", "event_id": "evt_bad", "item": {
        "type": "message", "role": "user", "content": [{"type": "output_text", "text": "hi"}]}},
     "invalid_value", "item.content[0].type"),
    ({"type": "conversation.item.create", "event_id": "evt_bad", "item": {
        "type": "message", "role": "assistant", "content": [{"type": "output_text"}]}},
     "missing_required_parameter", "item.content[0].text"),
    ({"type": "conversation.item.create", "event_id": "evt_bad", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}},
     "unsupported_parameter", "item.content[0]"),
    ({"type": "conversation.item.create", "event_id": "evt_bad", "item": {
        "type": "function_call_output", "output": "{}"}},
     "missing_required_parameter", "item.call_id"),
    ({"type": "response.create", "event_id": "evt_bad", "response": {"modalities": ["text"]}},
     "unknown_parameter", "response.modalities"),
    ({"type": "response.create", "event_id": "evt_bad", "response": {
        "input": [{"type": "item_reference"}]}},
     "missing_required_parameter", "response.input[0].id"),
    ({"type": "response.cancel", "event_id": "evt_bad", "response_id": 3},
     "invalid_type", "response_id"),
    ({"type": "session.updated", "event_id": "evt_bad"}, "invalid_event_type", "type"),
    ({"type": "transcription_session.update", "event_id": "evt_bad"},
     "invalid_event_type", "type"),
    ({"type": 7, "event_id": "evt_bad"}, "invalid_type", "type"),
    ({"event_id": "evt_bad"}, "missing_required_parameter", "type"),
])
def test_malformed_events_name_the_parameter(event, code, param):
    error = _error(event)
    assert (error.code, error.param, error.event_id) == (code, param, "evt_bad")
    assert error.type == "invalid_request_error"
    assert f"'{param}'" in error.message


@pytest.mark.parametrize(("session", "code", "param"), [
    ({"speed": 9}, "invalid_value", "session.speed"),
    ({"voice": 5}, "invalid_type", "session.voice"),
    ({"input_audio_format": "mp3"}, "invalid_value", "session.input_audio_format"),
    ({"turn_detection": {"type": "server_vad", "silence_duration_ms": -5}}, "invalid_value",
     "session.turn_detection.silence_duration_ms"),
    ({"input_audio_transcription": {"model": 1}}, "invalid_type",
     "session.input_audio_transcription.model"),
    ({"modalities": []}, "invalid_value", "session.modalities"),
    ({"max_response_output_tokens": 9999}, "invalid_value",
     "session.max_response_output_tokens"),
])
def test_beta_errors_name_the_beta_parameter(session, code, param):
    error = _error({"type": "session.update", "event_id": "evt_b", "session": session},
                   beta=True)
    assert (error.code, error.param, error.event_id) == (code, param, "evt_b")
    assert f"'{param}'" in error.message


@pytest.mark.parametrize(("raw", "code"), [
    ("{not json", "invalid_json"), ("", "invalid_json"), (b"\xff\xfe{", "invalid_json"),
    ("[1, 2]", "invalid_json"), ('"session.update"', "invalid_json"),
    ("[" * 100_000, "invalid_json"),
])
def test_undecodable_messages(raw, code):
    error = _error(raw)
    assert (error.code, error.param, error.event_id) == (code, None, None)


def test_ga_client_sending_the_beta_shape_is_told_how_to_connect():
    error = _error({"type": "session.update", "session": {"voice": "alloy"}})
    assert error.code == "missing_required_parameter"
    assert "OpenAI-Beta: realtime=v1" in error.message


def test_error_event_shape():
    error = _error(_update(audio={"output": {"speed": 9}}))
    event = error.to_event()
    validate_server_event(event)
    GA_SERVER.validate_python(event)
    assert event["error"] == {"type": "invalid_request_error", "code": "invalid_value",
                              "message": error.message, "param": "session.audio.output.speed",
                              "event_id": "evt_bad"}


def test_unknown_type_message_is_short():
    error = _error({"type": "x" * 10_000})
    assert len(error.message) < 700
    assert "session.update" in error.message


def test_huge_event_ids_are_not_echoed():
    error = _error({"type": "nope", "event_id": "e" * 10_000})
    assert error.event_id is None


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(GA_EVENTS)),
       st.dictionaries(st.sampled_from(["session", "item", "audio", "response", "item_id",
                                        "content_index", "audio_end_ms", "event_id",
                                        "previous_item_id", "response_id"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                                    | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                                    max_leaves=12)),
       st.booleans())
def test_arbitrary_events_give_an_error_or_a_valid_event(event_type, fields, beta):
    raw = _wire({"type": event_type, **fields})
    try:
        event = parse_client_event(raw, beta=beta)
    except RealtimeError as error:
        assert error.code and error.message
        validate_server_event(error.to_event())
    else:
        GA_CLIENT.validate_python(_sdk_typed(event))


def test_decode_audio():
    assert protocol.decode_audio(AUDIO_B64) == PCM
    with pytest.raises(RealtimeError) as caught:
        protocol.decode_audio("not base64!", event_id="evt_a")
    assert (caught.value.param, caught.value.event_id) == ("audio", "evt_a")
    too_big = base64.b64encode(bytes(protocol.MAX_APPEND_BYTES + 3)).decode()
    with pytest.raises(RealtimeError):
        protocol.decode_audio(too_big)


def test_parse_session_for_client_secrets():
    assert protocol.parse_session(GA_SESSION) == GA_SESSION
    assert protocol.parse_session(BETA_SESSION, beta=True) == BETA_AS_GA
    with pytest.raises(RealtimeError) as caught:
        protocol.parse_session({"type": "realtime", "audio": {"output": {"speed": 0}}})
    assert caught.value.param == "session.audio.output.speed"


# --- server events ------------------------------------------------------------------------

def sample_server_events() -> dict[str, dict]:
    """One server event of every type Parley emits, built with this package's helpers."""
    config = default_session(Settings(), "gpt-realtime")
    session = to_session_object(config, session_id=protocol.new_session_id(), beta=False,
                                expires_at=1_900_000_000)
    rid, iid, uid, cid = (protocol.new_response_id(), protocol.new_item_id(),
                          protocol.new_item_id(), protocol.new_call_id())
    user = {"id": uid, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
    spoken = {"id": iid, "object": "realtime.item", "type": "message", "status": "completed",
              "role": "assistant", "content": [{"type": "output_audio",
                                                "transcript": "Two people, at seven."}]}
    written = {**spoken, "content": [{"type": "output_text", "text": "Noted."}]}
    call = {"id": protocol.new_item_id(), "object": "realtime.item", "type": "function_call",
            "status": "completed", "name": "check_availability", "call_id": cid,
            "arguments": '{"date": "2031-03-04", "party_size": 2}'}
    result = {"id": protocol.new_item_id(), "object": "realtime.item",
              "type": "function_call_output", "call_id": cid, "output": '{"free": ["19:00"]}'}
    usage = {"total_tokens": 120, "input_tokens": 100, "output_tokens": 20,
             "input_token_details": {"text_tokens": 100, "audio_tokens": 0, "image_tokens": 0,
                                     "cached_tokens": 64,
                                     "cached_tokens_details": {"text_tokens": 64,
                                                               "audio_tokens": 0,
                                                               "image_tokens": 0}},
             "output_token_details": {"text_tokens": 20, "audio_tokens": 0}}
    done = to_response_object(config, response_id=rid, status="cancelled",
                              output=[spoken, call], conversation_id="conv_1",
                              status_details={"type": "cancelled", "reason": "turn_detected"},
                              usage=usage)
    stream = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
    truncated = {"item_id": iid, "content_index": 0, "audio_end_ms": 1530}
    events = [
        RealtimeError("Cancellation failed: no active response found",
                      code="response_cancel_not_active", event_id="evt_9").to_event(),
        server_event("session.created", session=session),
        server_event("session.updated", session=session),
        server_event("conversation.created",
                     conversation={"id": "conv_1", "object": "realtime.conversation"}),
        server_event("conversation.item.added", previous_item_id=None, item=user),
        server_event("conversation.item.done", previous_item_id=None, item=user),
        server_event("conversation.item.created", previous_item_id=uid, item=result),
        server_event("conversation.item.retrieved",
                     item={**user, "content": [{"type": "input_audio", "transcript": "hi",
                                                "audio": AUDIO_B64}]}),
        server_event("conversation.item.deleted", item_id=uid),
        server_event("conversation.item.truncated", **truncated),
        server_event("conversation.item.input_audio_transcription.delta", item_id=uid,
                     content_index=0, delta="Two peo"),
        server_event("conversation.item.input_audio_transcription.completed", item_id=uid,
                     content_index=0, transcript="Two people at seven.",
                     usage={"type": "duration", "seconds": 1.6}),
        server_event("conversation.item.input_audio_transcription.failed", item_id=uid,
                     content_index=0, error={"type": "server_error", "code": "asr_failed",
                                             "message": "The recogniser failed.", "param": None}),
        server_event("input_audio_buffer.speech_started", audio_start_ms=820, item_id=uid),
        server_event("input_audio_buffer.speech_stopped", audio_end_ms=2400, item_id=uid),
        server_event("input_audio_buffer.committed", previous_item_id=None, item_id=uid),
        server_event("input_audio_buffer.cleared"),
        server_event("input_audio_buffer.timeout_triggered", audio_start_ms=0,
                     audio_end_ms=5000, item_id=uid),
        server_event("response.created", response=to_response_object(config, response_id=rid)),
        server_event("response.done", response=done),
        server_event("response.output_item.added", response_id=rid, output_index=0,
                     item={**spoken, "status": "in_progress", "content": []}),
        server_event("response.output_item.done", response_id=rid, output_index=1, item=written),
        server_event("response.content_part.added", **stream,
                     part={"type": "audio", "transcript": ""}),
        server_event("response.content_part.done", **stream,
                     part={"type": "audio", "transcript": "Two people, at seven."}),
        server_event("response.output_text.delta", **stream, delta="Not"),
        server_event("response.output_text.done", **stream, text="Noted."),
        server_event("response.output_audio.delta", **stream, delta=AUDIO_B64),
        server_event("response.output_audio.done", **stream),
        server_event("response.output_audio_transcript.delta", **stream, delta="Two "),
        server_event("response.output_audio_transcript.done", **stream,
                     transcript="Two people, at seven."),
        server_event("response.function_call_arguments.delta", response_id=rid, item_id=iid,
                     output_index=1, call_id=cid, delta='{"date": '),
        server_event("response.function_call_arguments.done", response_id=rid, item_id=iid,
                     output_index=1, call_id=cid, name="check_availability",
                     arguments=call["arguments"]),
        server_event("rate_limits.updated", rate_limits=[
            {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
            {"name": "tokens", "limit": 50000, "remaining": 49000, "reset_seconds": 1.2}]),
        server_event("parley.turn.latency", response_id=rid, item_id=iid,
                     voice_to_voice_ms=640.5,
                     stages_ms={"end_of_speech_to_commit": 500, "prefill": 60.2,
                                "first_token": 30.1, "tts_first_chunk": 50.2}),
    ]
    return {event["type"]: event for event in events}


def test_every_server_event_type_has_a_sample():
    spec = protocol.schema(protocol.SERVER_SCHEMA)
    assert set(sample_server_events()) == set(spec["properties"]["type"]["enum"])


@pytest.mark.parametrize("event", list(sample_server_events().values()), ids=lambda e: e["type"])
def test_server_events_match_the_schema_and_the_sdk(event):
    validate_server_event(event)
    assert re.fullmatch(r"event_[A-Za-z0-9]{21}", event["event_id"])
    if not event["type"].startswith("parley."):
        GA_SERVER.validate_python(event)


def test_server_schema_rejects_mistakes():
    events = sample_server_events()
    bad = [
        {**events["response.output_audio.delta"], "type": "response.audio.delta"},
        {k: v for k, v in events["response.output_audio.delta"].items() if k != "item_id"},
        {**events["input_audio_buffer.cleared"], "extra": 1},
        {**events["response.done"], "response": {**events["response.done"]["response"],
                                                 "status": "stopped"}},
        {**events["conversation.item.added"], "item": {**events["conversation.item.added"]["item"],
                                                       "role": "user", "content": [
                                                           {"type": "output_text", "text": "x"}]}},
    ]
    for event in bad:
        with pytest.raises(ValueError):
            validate_server_event(event)


def test_ga_clients_get_server_events_unchanged():
    for event in sample_server_events().values():
        assert to_client(event, beta=False) is event


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}


@pytest.mark.parametrize("event", list(sample_server_events().values()), ids=lambda e: e["type"])
def test_beta_clients_get_beta_events(event):
    before = copy.deepcopy(event)
    beta = to_client(event, beta=True)
    assert event == before                         # the GA event is left as it was
    if event["type"] in ("conversation.item.done", "input_audio_buffer.timeout_triggered"):
        assert beta is None
        return
    assert beta["type"] == BETA_NAMES.get(event["type"], event["type"])
    assert beta["event_id"] == event["event_id"]
    if not event["type"].startswith("parley."):
        BETA_SERVER.validate_python(beta)
    text = json.dumps(beta)
    for ga_only in ('"output_text"', '"output_audio"', '"output_modalities"'):
        assert ga_only not in text


def test_beta_session_and_response_shapes():
    events = sample_server_events()
    session = to_client(events["session.created"], beta=True)["session"]
    assert session["voice"] == "alloy"
    assert (session["input_audio_format"], session["output_audio_format"]) == ("pcm16", "pcm16")
    assert session["modalities"] == ["text", "audio"]
    assert session["turn_detection"]["type"] == "server_vad"
    assert "audio" not in session and "type" not in session
    response = to_client(events["response.done"], beta=True)["response"]
    assert (response["voice"], response["output_audio_format"]) == ("alloy", "pcm16")
    assert response["modalities"] == ["text", "audio"]
    assert response["output"][0]["content"][0]["type"] == "audio"
    assert response["status_details"]["reason"] == "turn_detected"


def test_ids_look_like_openais():
    ids = [protocol.new_event_id(), protocol.new_item_id(), protocol.new_response_id(),
           protocol.new_session_id(), protocol.new_call_id(), protocol.new_conversation_id()]
    for value, prefix in zip(ids, ("event", "item", "resp", "sess", "call", "conv"), strict=True):
        assert re.fullmatch(prefix + r"_[A-Za-z0-9]{16,21}", value)
    many = {protocol.new_item_id() for _ in range(1000)}
    assert len(many) == 1000


def test_append_validation_reuses_one_validator():
    event = _wire({"type": "input_audio_buffer.append", "audio": AUDIO_B64})
    parse_client_event(event, beta=False)
    before = protocol._client_validator.cache_info().misses
    for _ in range(50):
        parse_client_event(event, beta=False)
    assert protocol._client_validator.cache_info().misses == before
    assert np.frombuffer(protocol.decode_audio(AUDIO_B64), "<i2").size == len(PCM) // 2


def test_whole_client_schema_agrees_with_the_per_type_checks():
    root = jsonschema.Draft202012Validator(protocol.schema(protocol.CLIENT_SCHEMA))
    for event in GA_EVENTS.values():
        assert root.is_valid(event)
    assert not root.is_valid({"type": "session.updated"})
    assert not root.is_valid(_update(audio={"output": {"speed": 4.5}}))
