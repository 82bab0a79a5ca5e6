"""Session configuration: defaults from the settings, partial updates, what clients see."""

from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest
from openai.types.beta.realtime.session import Session as BetaSession
from openai.types.realtime import SessionCreatedEvent

from agent.audio.formats import RAW_FORMATS
from agent.config import Settings
from agent.dispatch import load_tool_schema
from agent.realtime import protocol
from agent.realtime.protocol import RealtimeError, server_event, validate_server_event
from agent.realtime.session_config import (
    SEMANTIC_SILENCE_MS,
    AudioFormat,
    SessionConfig,
    Transcription,
    TurnDetection,
    apply_update,
    default_session,
    for_response,
    to_response_object,
    to_session_object,
)

SETTINGS = Settings(vad_threshold=0.4, vad_prefix_padding_ms=250, vad_silence_duration_ms=650,
                    default_voice="echo", default_temperature=0.5, voices={"nora": "joe"})
TOOL = {"type": "function", "name": "check_availability", "description": "Free tables.",
        "parameters": load_tool_schema("check_availability")}


@pytest.fixture
def config() -> SessionConfig:
    return default_session(SETTINGS, "gpt-realtime")


def _update(config: SessionConfig, session: dict, **kwargs) -> SessionConfig:
    """An update as it comes off the wire: parsed and checked first."""
    event = protocol.parse_client_event(
        json.dumps({"type": "session.update", "session": {"type": "realtime",
                                                                    **session}}),
        beta=False)
    return apply_update(config, event["session"], **kwargs)


def _vad(**fields) -> dict:
    return {"audio": {"input": {"turn_detection": fields}}}


def test_default_session_follows_openai_and_the_settings(config):
    assert config.model == "gpt-realtime"
    assert config.voice == "echo" and config.temperature == 0.5
    assert config.turn_detection == TurnDetection(threshold=0.4, prefix_padding_ms=250,
                                                  silence_duration_ms=650)
    assert config.turn_detection.create_response and config.turn_detection.interrupt_response
    assert config.input_format == config.output_format == AudioFormat("pcm16", 24000)
    assert config.output_modalities == ("audio",) and config.audio_output
    assert (config.max_output_tokens, config.tool_choice, config.tools) == ("inf", "auto", ())
    assert config.transcription is None and config.noise_reduction is None
    assert (config.server_tools, config.debug_events) == (None, False)
    assert config.instructions


def test_plain_settings_give_openai_vad_defaults():
    vad = default_session(Settings(), "m").turn_detection
    assert (vad.type, vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms) == \
        ("server_vad", 0.5, 300, 500)


@pytest.mark.parametrize("beta", [False, True])
def test_session_object_matches_the_schema_and_the_sdk(config, beta):
    session = to_session_object(config, session_id="sess_abc", beta=beta, expires_at=1)
    if beta:
        parsed = BetaSession.model_validate(session)
        assert (parsed.voice, parsed.input_audio_format, parsed.temperature) == \
            ("echo", "pcm16", 0.5)
        assert parsed.turn_detection.silence_duration_ms == 650
        return
    event = server_event("session.created", session=session)
    validate_server_event(event)
    parsed = pydantic.TypeAdapter(SessionCreatedEvent).validate_python(event).session
    assert parsed.audio.output.voice == "echo"
    assert parsed.audio.input.turn_detection.threshold == 0.4
    assert session["parley"] == {"server_tools": None, "backchannel_ms": 500,
                                 "debug_events": False, "speculate": True}


def test_an_update_changes_only_what_it_names(config):
    updated = _update(config, {"instructions": "Speak like a pirate."})
    assert updated.instructions == "Speak like a pirate."
    assert dataclasses.replace(updated, instructions=config.instructions) == config
    assert config.instructions != updated.instructions          # the old one is untouched


def test_turn_detection_merges_within_its_kind(config):
    first = _update(config, _vad(type="server_vad", threshold=0.7))
    second = _update(first, _vad(type="server_vad", silence_duration_ms=900,
                                 interrupt_response=False))
    assert second.turn_detection == TurnDetection(
        threshold=0.7, prefix_padding_ms=250, silence_duration_ms=900, interrupt_response=False)


def test_semantic_vad_runs_server_vad_with_an_eagerness_silence(config):
    eager = _update(config, _vad(type="semantic_vad", eagerness="high"))
    assert eager.turn_detection.type == "semantic_vad"
    assert eager.turn_detection.silence_duration_ms == SEMANTIC_SILENCE_MS["high"]
    assert eager.turn_detection.threshold == 0.4          # the server's VAD threshold
    patient = _update(eager, _vad(type="semantic_vad", eagerness="low"))
    assert patient.turn_detection.silence_duration_ms > eager.turn_detection.silence_duration_ms
    shown = to_session_object(patient, session_id="sess_1", beta=False)
    assert shown["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad", "eagerness": "low", "create_response": True,
        "interrupt_response": True}
    back = _update(patient, _vad(type="server_vad"))
    assert back.turn_detection == config.turn_detection     # a new kind starts from defaults


def test_manual_turns_and_back(config):
    manual = _update(config, {"audio": {"input": {"turn_detection": None}}})
    assert manual.turn_detection is None
    shown = to_session_object(manual, session_id="sess_1", beta=False)
    assert shown["audio"]["input"]["turn_detection"] is None
    validate_server_event(server_event("session.updated", session=shown))
    assert _update(manual, _vad(type="server_vad")).turn_detection == config.turn_detection


def test_transcription_merges_and_turns_off(config):
    on = _update(config, {"audio": {"input": {"transcription": {"model": "whisper-1",
                                                                  "language": "de"}}}})
    assert on.transcription == Transcription("whisper-1", "de", None)
    prompted = _update(on, {"audio": {"input": {"transcription": {"prompt": "Namen"}}}})
    assert prompted.transcription == Transcription("whisper-1", "de", "Namen")
    assert _update(prompted, {"audio": {"input": {"transcription": None}}}).transcription is None


def test_noise_reduction(config):
    far = _update(config, {"audio": {"input": {"noise_reduction": {"type": "far_field"}}}})
    assert far.noise_reduction == "far_field"
    assert _update(far, {"audio": {"input": {"noise_reduction": {"strength": 0.5}}}}) \
        .noise_reduction == "far_field"
    assert _update(far, {"audio": {"input": {"noise_reduction": None}}}).noise_reduction is None


@pytest.mark.parametrize(("ga", "kind", "rate", "codec"), [
    ({"type": "audio/pcm", "rate": 24000}, "pcm16", 24000, "pcm16"),
    ({"type": "audio/pcm"}, "pcm16", 24000, "pcm16"),
    ({"type": "audio/pcmu"}, "pcmu", 8000, "g711_ulaw"),
    ({"type": "audio/pcma"}, "pcma", 8000, "g711_alaw"),
    ({"type": "audio/opus"}, "opus", 48000, "opus"),
])
def test_input_formats(config, ga, kind, rate, codec):
    updated = _update(config, {"audio": {"input": {"format": ga}}})
    assert updated.input_format == AudioFormat(kind, rate)
    assert updated.input_format.codec == codec
    assert codec in (*RAW_FORMATS, "opus")                  # names agent.audio decodes
    shown = to_session_object(updated, session_id="sess_1", beta=False)
    assert AudioFormat.from_ga(shown["audio"]["input"]["format"]) == updated.input_format


def test_output_format_speed_and_modalities(config):
    updated = _update(config, {"output_modalities": ["text"],
                               "audio": {"output": {"format": {"type": "audio/pcmu"},
                                                    "speed": 3.5}}})
    assert (updated.output_format, updated.speed) == (AudioFormat("pcmu", 8000), 3.5)
    assert not updated.audio_output


@pytest.mark.parametrize("voice", ["alloy", "marin", "nora", "joe", {"id": "cedar"}])
def test_known_voices(config, voice):
    updated = _update(config, {"audio": {"output": {"voice": voice}}})
    assert updated.voice == (voice["id"] if isinstance(voice, dict) else voice)


def test_unknown_voice(config):
    session = {"type": "realtime", "audio": {"output": {"voice": "gandalf"}}}
    with pytest.raises(RealtimeError) as caught:
        apply_update(config, session, event_id="evt_v")
    error = caught.value
    assert (error.code, error.param, error.event_id) == \
        ("invalid_value", "session.audio.output.voice", "evt_v")
    assert "gandalf" in error.message and "alloy" in error.message
    with pytest.raises(RealtimeError) as caught:
        apply_update(config, session, beta=True)
    assert caught.value.param == "session.voice"


def test_voice_lock(config):
    with pytest.raises(RealtimeError) as caught:
        _update(config, {"audio": {"output": {"voice": "ash"}}}, voice_locked=True)
    assert caught.value.code == "cannot_update_voice"
    # Sending the voice in use again (clients resend whole sessions) is not a change.
    same = _update(config, {"audio": {"output": {"voice": "echo"}}, "instructions": "x"},
                   voice_locked=True)
    assert same.voice == "echo" and same.instructions == "x"


def test_tools(config):
    tool = {**TOOL, "parameters": load_tool_schema("check_availability")}
    updated = _update(config, {"tools": [tool], "tool_choice": "required"})
    assert updated.tools == (tool,) and updated.tool_choice == "required"
    tool["parameters"]["properties"].clear()                 # the config holds its own copy
    assert updated.tools[0]["parameters"]["properties"]
    untyped = {k: v for k, v in TOOL.items() if k != "type"}
    assert _update(config, {"tools": [untyped]}).tools[0]["type"] == "function"
    assert _update(updated, {"tools": []}).tools == ()


def test_tool_mistakes_a_schema_cannot_catch(config):
    with pytest.raises(RealtimeError) as caught:
        _update(config, {"tools": [TOOL, TOOL]})
    assert caught.value.param == "session.tools[1].name"
    broken = {**TOOL, "parameters": {"type": "object", "properties": {"n": {"type": 7}}}}
    with pytest.raises(RealtimeError) as caught:
        _update(config, {"tools": [broken]})
    assert caught.value.param == "session.tools[0].parameters"


def test_parley_options_and_limits(config):
    updated = _update(config, {"max_output_tokens": 200, "temperature": 1.1,
                               "parley": {"server_tools": True, "backchannel_ms": 900,
                                          "debug_events": True, "speculate": False}})
    assert (updated.server_tools, updated.backchannel_ms, updated.debug_events,
            updated.speculate) == (True, 900, True, False)
    assert (updated.output_token_limit(512), config.output_token_limit(512)) == (200, 512)
    assert updated.output_token_limit(100) == 100
    assert updated.temperature == 1.1
    assert _update(updated, {"max_output_tokens": "inf"}).max_output_tokens == "inf"


def test_model_stays_what_the_session_connected_with(config):
    assert _update(config, {"model": "gpt-4o-realtime-preview"}).model == "gpt-realtime"


def test_response_overrides_leave_the_session_alone(config):
    params = protocol.parse_client_event(json.dumps({
        "type": "response.create", "response": {
            "instructions": "One word.", "output_modalities": ["text"], "temperature": 0.2,
            "audio": {"output": {"voice": "ash", "format": {"type": "audio/pcma"}}},
            "tools": [TOOL], "tool_choice": {"type": "function", "name": TOOL["name"]},
            "max_output_tokens": 16, "metadata": {"k": "v"}}}), beta=False)["response"]
    one = for_response(config, params)
    assert (one.instructions, one.output_modalities, one.temperature, one.voice) == \
        ("One word.", ("text",), 0.2, "ash")
    assert (one.output_format, one.max_output_tokens) == (AudioFormat("pcma", 8000), 16)
    assert one.tool_choice == {"type": "function", "name": TOOL["name"]}
    assert one.turn_detection == config.turn_detection
    assert for_response(config, None) is config
    with pytest.raises(RealtimeError) as caught:
        for_response(config, {"audio": {"output": {"voice": "gandalf"}}}, beta=True)
    assert caught.value.param == "response.voice"


def test_response_objects(config):
    created = to_response_object(config, response_id="resp_1")
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert created["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                          "voice": "echo"}
    done = to_response_object(config, response_id="resp_1", status="incomplete",
                              status_details={"type": "incomplete",
                                              "reason": "max_output_tokens"})
    for event in (server_event("response.created", response=created),
                  server_event("response.done", response=done)):
        validate_server_event(event)
        beta = protocol.to_client(event, beta=True)["response"]
        assert (beta["voice"], beta["output_audio_format"]) == ("echo", "pcm16")
