"""The Realtime wire protocol: client events in, server events out, beta and GA shapes.

The session manager works in OpenAI's GA shape only. This module stands between it and
the socket:

- `parse_client_event` turns a WebSocket message into a GA client event, translating the
  retired beta shape first for clients that connected with `OpenAI-Beta: realtime=v1`, and
  checks it against `schemas/realtime/client_events.json`. Anything wrong becomes a
  `RealtimeError` naming the parameter as the client wrote it; `to_event()` is the `error`
  event to send back, after which the session carries on.
- `to_client` renders a GA server event for the connection's client: unchanged for GA,
  renamed and reshaped for beta (None when beta has no such event).
- ids and the `event_id` of each server event look like OpenAI's (`event_…`, `item_…`).

Raw Opus input (a Parley extension, `audio.input.format = {"type": "audio/opus"}`) is
framed by the events themselves: each `input_audio_buffer.append` carries exactly one Opus
packet, because a bare packet does not say how long it is.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import secrets
import string
from collections.abc import Callable
from typing import Any

import jsonschema
from referencing import Registry, Resource

from agent.errors import InvalidRequestError, ParleyError
from agent.json_schema import Problem, first_problem, schema, validator_class

CLIENT_SCHEMA = "realtime/client_events"
SERVER_SCHEMA = "realtime/server_events"
# OpenAI's limit on the audio of one input_audio_buffer.append.
MAX_APPEND_BYTES = 15 * 1024 * 1024
_MAX_ECHOED_EVENT_ID = 512


class RealtimeError(InvalidRequestError):
    """A client mistake reported as an `error` event; the session goes on afterwards."""

    def __init__(self, message: str, *, code: str | None = "invalid_value",
                 param: str | None = None, event_id: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message, param=param)
        self.code = code
        self.event_id = event_id
        self.type = type

    def to_event(self) -> dict[str, Any]:
        """The `error` server event; `error.event_id` is the offending client event's id."""
        return error_event(self, self.event_id)


def error_event(error: ParleyError, event_id: str | None) -> dict[str, Any]:
    """The `error` server event for any typed error: OpenAI's error object, with the id of
    the client event that caused it."""
    return server_event("error", error={**error.to_dict()["error"], "event_id": event_id})


# --- ids ----------------------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 21) -> str:
    """`<prefix>_` and random letters and digits, the way OpenAI's ids look."""
    return prefix + "_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_event_id() -> str:
    return new_id("event")


def new_item_id() -> str:
    return new_id("item")


def new_response_id() -> str:
    return new_id("resp")


def new_call_id() -> str:
    return new_id("call", 16)


def new_session_id() -> str:
    return new_id("sess")


def new_conversation_id() -> str:
    return new_id("conv")


def server_event(event_type: str, **fields: Any) -> dict[str, Any]:
    """A GA server event with a fresh `event_id`: server_event("input_audio_buffer.cleared")."""
    return {"type": event_type, "event_id": new_event_id(), **fields}


# --- validation ---------------------------------------------------------------------------

@functools.cache
def _registry() -> Registry:
    resources = [(f"parley:{name}", Resource.from_contents(schema(name)))
                 for name in (CLIENT_SCHEMA, SERVER_SCHEMA)]
    return Registry().with_resources(resources)


@functools.cache
def client_event_types() -> tuple[str, ...]:
    """Every client event type Parley accepts (GA names)."""
    return tuple(schema(CLIENT_SCHEMA)["properties"]["type"]["enum"])


@functools.cache
def _client_schema_class() -> type[jsonschema.protocols.Validator]:
    return validator_class(schema(CLIENT_SCHEMA))


@functools.cache
def _client_validator(event_type: str) -> jsonschema.protocols.Validator:
    # One validator per event type, its references resolved once: an append is checked
    # against its own two fields with no reference lookups on the way (twice as fast).
    root = schema(CLIENT_SCHEMA)
    return _client_schema_class()(_inline(root["$defs"][event_type], root))


def _inline(node: Any, root: dict[str, Any]) -> Any:
    """`node` with every local "#/..." reference replaced by what it points at (the client
    schema has no recursive references)."""
    if isinstance(node, list):
        return [_inline(v, root) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        rest = {k: v for k, v in node.items() if k != "$ref"}
        resolved = _inline(target, root)
        return {"allOf": [resolved, _inline(rest, root)]} if rest else resolved
    return {k: _inline(v, root) for k, v in node.items()}


@functools.cache
def _server_validator() -> jsonschema.protocols.Validator:
    cls = validator_class(schema(SERVER_SCHEMA))
    return cls({"$ref": f"parley:{SERVER_SCHEMA}"}, registry=_registry())


def validate_server_event(event: dict[str, Any]) -> None:
    """Raise ValueError if `event` is not a server event as server_events.json describes."""
    problem = first_problem(_server_validator().iter_errors(event))
    if problem is not None:
        where = problem.path or "the event"
        raise ValueError(f"{event.get('type')!r} event, at {where}: "
                         f"{problem.error.message[:500]}")


Rename = Callable[[str], str]


def _check(event_type: str, event: dict[str, Any], rename: Rename) -> None:
    problem = first_problem(_client_validator(event_type).iter_errors(event))
    if problem is not None:
        raise _schema_error(problem, rename)


def _schema_error(problem: Problem, rename: Rename) -> RealtimeError:
    error, path = problem.error, problem.path
    param = rename(path) if path else None
    where = f"'{param}'" if param else "the event"
    spec = error.schema if isinstance(error.schema, dict) else {}
    if hint := spec.get("x-parley-unsupported"):
        return RealtimeError(f"Unsupported parameter: {where}. {hint}", param=param,
                             code="unsupported_parameter")
    if problem.kind in ("required", "unknown"):
        full = rename(problem.field or "")
        if problem.kind == "required":
            return RealtimeError(f"Missing required parameter: '{full}'.", param=full,
                                 code="missing_required_parameter")
        return RealtimeError(f"Unknown parameter: '{full}'.", param=full,
                             code="unknown_parameter")
    if error.validator == "type":
        return RealtimeError(f"Invalid type for {where}: expected {_types(error.validator_value)},"
                             f" but got {_json_type(error.instance)} instead.", param=param,
                             code="invalid_type")
    if expected := spec.get("x-parley-expected"):
        return RealtimeError(f"Invalid value for {where}: expected {expected}, but got "
                             f"{_show(error.instance)}.", param=param)
    if error.validator in ("enum", "const"):
        allowed = error.validator_value if error.validator == "enum" else [error.validator_value]
        return RealtimeError(f"Invalid value for {where}: {_show(error.instance)}. Supported "
                             f"values are: {_listing(allowed)}.", param=param)
    if error.validator in ("minimum", "maximum"):
        side = ">=" if error.validator == "minimum" else "<="
        return RealtimeError(f"Invalid value for {where}: expected a value {side} "
                             f"{error.validator_value}, but got {_show(error.instance)}.",
                             param=param)
    if error.validator in _LENGTHS:
        unit, side = _LENGTHS[error.validator]
        count = error.validator_value
        return RealtimeError(f"Invalid value for {where}: expected {side} {count} "
                             f"{unit}{'' if count == 1 else 's'}.", param=param)
    return RealtimeError(f"Invalid value for {where}: {_short(error.message)}", param=param)


_LENGTHS = {"minItems": ("item", "at least"), "maxItems": ("item", "at most"),
            "minLength": ("character", "at least"), "maxLength": ("character", "at most"),
            "minProperties": ("key", "at least"), "maxProperties": ("key", "at most")}


def _types(value: Any) -> str:
    names = value if isinstance(value, list) else [value]
    return " or ".join(("an " if n in ("object", "array", "integer") else "a ") + n
                       for n in names if n != "null") or "null"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return "'" + _short(value, 80) + "'"
    return _short(json.dumps(value), 80)


def _listing(values: list[Any]) -> str:
    shown = [_show(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + ", and " + shown[-1]


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _same(param: str) -> str:
    return param


# --- client events ------------------------------------------------------------------------

def parse_client_event(raw: str | bytes, *, beta: bool) -> dict[str, Any]:
    """A WebSocket message as a schema-valid GA client event, or RealtimeError.

    `beta`: the client connected with the beta header; its events are translated to GA
    first and errors name the parameters as the beta client wrote them."""
    event = _decode_json(raw)
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or len(event_id) > _MAX_ECHOED_EVENT_ID:
        event_id = None
    try:
        event_type = _event_type(event)
        if beta:
            event = beta_event_to_ga(event)
        _check(event_type, event, beta_param if beta else _same)
    except RealtimeError as exc:
        exc.event_id = exc.event_id or event_id
        if not beta and _looks_beta(event):
            exc.message += (" This looks like the beta session shape: connect with the header "
                            "'OpenAI-Beta: realtime=v1' to use it.")
        raise
    return event


_BETA_SESSION_KEYS = frozenset({
    "modalities", "voice", "input_audio_format", "output_audio_format", "turn_detection",
    "input_audio_transcription", "input_audio_noise_reduction", "speed",
    "max_response_output_tokens"})


def _looks_beta(event: dict[str, Any]) -> bool:
    session = event.get("session") if event.get("type") == "session.update" else None
    return isinstance(session, dict) and not _BETA_SESSION_KEYS.isdisjoint(session)


def parse_session(session: Any, *, beta: bool = False) -> dict[str, Any]:
    """A session configuration outside a session.update (the body of a client-secret
    request): the GA `session` object, or RealtimeError with params under `session.`."""
    event = {"type": "session.update", "session": session}
    if beta:
        event = beta_event_to_ga(event)
    _check("session.update", event, beta_param if beta else _same)
    return event["session"]


def _decode_json(raw: str | bytes) -> dict[str, Any]:
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "cannot decode it"
        raise RealtimeError(f"The event is not valid JSON: {detail}.", code="invalid_json") \
            from None
    if not isinstance(event, dict):
        raise RealtimeError(f"A client event must be a JSON object, not {_json_type(event)}.",
                            code="invalid_json")
    return event


def _event_type(event: dict[str, Any]) -> str:
    event_type = event.get("type")
    if event_type is None:
        raise RealtimeError("Missing required parameter: 'type'.", param="type",
                            code="missing_required_parameter")
    if not isinstance(event_type, str):
        raise RealtimeError(f"Invalid type for 'type': expected a string, but got "
                            f"{_json_type(event_type)} instead.", param="type",
                            code="invalid_type")
    if event_type not in client_event_types():
        if event_type.startswith("transcription_session."):
            raise RealtimeError(f"Invalid value for 'type': {_show(event_type)}. Transcription "
                                "sessions are not supported by Parley; use a realtime session "
                                "with audio.input.transcription.",
                                param="type", code="invalid_event_type")
        raise RealtimeError(f"Invalid value for 'type': {_show(event_type)} is not a client "
                            f"event type. Supported values are: "
                            f"{_listing(list(client_event_types()))}.",
                            param="type", code="invalid_event_type")
    return event_type


def decode_audio(audio: str, *, param: str = "audio", event_id: str | None = None) -> bytes:
    """The bytes of a base64 `audio` field (an append's, or a content part's)."""
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError(f"Invalid '{param}': expected base64-encoded audio bytes.",
                            param=param, event_id=event_id) from None
    if len(data) > MAX_APPEND_BYTES:
        raise RealtimeError(f"Invalid '{param}': {len(data)} bytes of audio is more than the "
                            f"{MAX_APPEND_BYTES} one event may carry.", param=param,
                            event_id=event_id)
    return data


# --- beta → GA (client events) ------------------------------------------------------------

# Beta audio format names and the GA format objects they mean ("opus" is Parley's).
BETA_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
    "opus": {"type": "audio/opus"},
}
_GA_FORMAT_NAMES = {fmt["type"]: name for name, fmt in BETA_FORMATS.items()}

# GA parameter paths and what a beta client called them, for error messages.
_BETA_PATHS = (
    ("session.audio.input.format", "session.input_audio_format"),
    ("session.audio.input.turn_detection", "session.turn_detection"),
    ("session.audio.input.transcription", "session.input_audio_transcription"),
    ("session.audio.input.noise_reduction", "session.input_audio_noise_reduction"),
    ("session.audio.output.format", "session.output_audio_format"),
    ("session.audio.output.voice", "session.voice"),
    ("session.audio.output.speed", "session.speed"),
    ("session.output_modalities", "session.modalities"),
    ("session.max_output_tokens", "session.max_response_output_tokens"),
    ("response.audio.output.format", "response.output_audio_format"),
    ("response.audio.output.voice", "response.voice"),
    ("response.output_modalities", "response.modalities"),
    ("response.max_output_tokens", "response.max_response_output_tokens"),
)
_SERVER_VAD_ONLY = ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms")


def beta_param(param: str) -> str:
    """A GA parameter path as a beta client wrote it: session.audio.output.voice → session.voice."""
    for ga, beta in _BETA_PATHS:
        if param == ga or param.startswith((ga + ".", ga + "[")):
            return beta + param[len(ga):]
    return param


def beta_event_to_ga(event: dict[str, Any]) -> dict[str, Any]:
    """A beta client event in GA shape. Only the shapes differ (the client event names are
    the same); what cannot be translated is left for the GA schema to reject."""
    kind = event.get("type")
    if kind == "session.update" and isinstance(event.get("session"), dict):
        return {**event, "session": beta_session_to_ga(event["session"])}
    if kind == "conversation.item.create" and isinstance(event.get("item"), dict):
        return {**event, "item": _beta_item_to_ga(event["item"])}
    if kind == "response.create" and isinstance(event.get("response"), dict):
        return {**event, "response": _beta_response_to_ga(event["response"])}
    return event


def beta_session_to_ga(session: dict[str, Any]) -> dict[str, Any]:
    """The beta session shape (flat, top-level audio fields) as a GA session."""
    out: dict[str, Any] = {"type": "realtime"}
    audio_in: dict[str, Any] = {}
    audio_out: dict[str, Any] = {}
    for key, value in session.items():
        if key == "input_audio_format":
            audio_in["format"] = _beta_format(value, "session.input_audio_format")
        elif key == "output_audio_format":
            audio_out["format"] = _beta_format(value, "session.output_audio_format")
        elif key == "turn_detection":
            audio_in["turn_detection"] = _beta_turn_detection(value)
        elif key == "input_audio_transcription":
            audio_in["transcription"] = value
        elif key == "input_audio_noise_reduction":
            audio_in["noise_reduction"] = value
        elif key in ("voice", "speed"):
            audio_out[key] = value
        elif key == "modalities":
            out["output_modalities"] = _beta_modalities(value)
        elif key == "max_response_output_tokens":
            out["max_output_tokens"] = value
        elif key == "tool_choice":
            out["tool_choice"] = _beta_tool_choice(value)
        elif key != "client_secret":    # beta's client_secret only shaped key minting
            out[key] = value
    if audio_in or audio_out:
        current = out.get("audio")
        audio: dict[str, Any] = current if isinstance(current, dict) else {}
        for side, fields in (("input", audio_in), ("output", audio_out)):
            if fields:
                held = audio.get(side)
                given: dict[str, Any] = held if isinstance(held, dict) else {}
                audio = {**audio, side: {**given, **fields}}
        out["audio"] = audio
    return out


def _beta_format(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str) and value in BETA_FORMATS:
        return dict(BETA_FORMATS[value])
    raise RealtimeError(f"Invalid value for '{param}': {_show(value)}. Supported values are: "
                        f"{_listing(list(BETA_FORMATS))}.", param=param)


def _beta_turn_detection(value: Any) -> Any:
    # Beta had one flat object for both kinds; GA rejects the other kind's fields.
    if not isinstance(value, dict):
        return value
    kind = value.get("type", "server_vad")
    drop = ("eagerness",) if kind == "server_vad" else _SERVER_VAD_ONLY
    return {"type": kind, **{k: v for k, v in value.items() if k not in drop and k != "type"}}


def _beta_modalities(value: Any) -> Any:
    if isinstance(value, list) and value and all(m in ("text", "audio") for m in value):
        return ["audio"] if "audio" in value else ["text"]
    return value


def _beta_tool_choice(value: Any) -> Any:
    if isinstance(value, str) and value not in ("auto", "none", "required"):
        return {"type": "function", "name": value}
    return value


def _beta_item_to_ga(item: Any) -> Any:
    """Beta content types in GA names: assistant text/audio → output_text/output_audio."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), list):
        return item
    side = "output" if item.get("role") == "assistant" else "input"
    content = [{**part, "type": f"{side}_{part['type']}"}
               if isinstance(part, dict) and part.get("type") in ("text", "audio") else part
               for part in item["content"]]
    return {**item, "content": content}


def _beta_response_to_ga(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    output: dict[str, Any] = {}
    for key, value in params.items():
        if key == "modalities":
            out["output_modalities"] = _beta_modalities(value)
        elif key == "voice":
            output["voice"] = value
        elif key == "output_audio_format":
            output["format"] = _beta_format(value, "response.output_audio_format")
        elif key == "max_response_output_tokens":
            out["max_output_tokens"] = value
        elif key == "tool_choice":
            out["tool_choice"] = _beta_tool_choice(value)
        elif key == "input" and isinstance(value, list):
            out["input"] = [_beta_item_to_ga(item) for item in value]
        else:
            out[key] = value
    if output:
        out["audio"] = {"output": output}
    return out


# --- GA → beta (server events) ------------------------------------------------------------

_BETA_EVENT_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
# GA events a beta client has no name for: it never receives them.
_GA_ONLY_EVENTS = frozenset({
    "conversation.item.done", "input_audio_buffer.timeout_triggered",
    "conversation.item.input_audio_transcription.segment",
    "input_audio_buffer.dtmf_event_received",
})
_BETA_CONTENT_TYPES = {"output_text": "text", "output_audio": "audio"}


def to_client(event: dict[str, Any], *, beta: bool) -> dict[str, Any] | None:
    """A GA server event as this client expects it; None means: do not send it.
    The event passed in is never modified."""
    if not beta:
        return event
    kind = event["type"]
    if kind in _GA_ONLY_EVENTS:
        return None
    out = {**event, "type": _BETA_EVENT_NAMES.get(kind, kind)}
    if isinstance(out.get("session"), dict):
        out["session"] = session_to_beta(out["session"])
    if isinstance(out.get("item"), dict):
        out["item"] = item_to_beta(out["item"])
    if isinstance(out.get("part"), dict):
        out["part"] = _part_to_beta(out["part"])
    if kind.startswith("response.") and isinstance(out.get("response"), dict):
        out["response"] = response_to_beta(out["response"])
    return out


def session_to_beta(session: dict[str, Any]) -> dict[str, Any]:
    """A GA session object in the beta shape (session.created/updated for beta clients)."""
    audio = session.get("audio") or {}
    audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
    out = {k: v for k, v in session.items()
           if k not in ("type", "audio", "output_modalities", "max_output_tokens", "include",
                        "prompt")}
    if "output_modalities" in session:
        out["modalities"] = _modalities_to_beta(session["output_modalities"])
    if "format" in audio_in:
        out["input_audio_format"] = format_to_beta(audio_in["format"])
    if "format" in audio_out:
        out["output_audio_format"] = format_to_beta(audio_out["format"])
    for ga, beta in (("transcription", "input_audio_transcription"),
                     ("noise_reduction", "input_audio_noise_reduction"),
                     ("turn_detection", "turn_detection")):
        if ga in audio_in:
            out[beta] = audio_in[ga]
    for key in ("voice", "speed"):
        if key in audio_out:
            out[key] = audio_out[key]
    if "max_output_tokens" in session:
        out["max_response_output_tokens"] = session["max_output_tokens"]
    return out


def format_to_beta(fmt: dict[str, Any]) -> str:
    """{"type": "audio/pcm", "rate": 24000} → "pcm16", and so on."""
    return _GA_FORMAT_NAMES[fmt["type"]]


def _modalities_to_beta(modalities: list[str]) -> list[str]:
    return ["text"] if modalities == ["text"] else ["text", "audio"]


def item_to_beta(item: dict[str, Any]) -> dict[str, Any]:
    """Output content types in their beta names (output_text → text, output_audio → audio)."""
    if not isinstance(item.get("content"), list):
        return item
    return {**item, "content": [_part_to_beta(p) if isinstance(p, dict) else p
                                for p in item["content"]]}


def _part_to_beta(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    return {**part, "type": _BETA_CONTENT_TYPES[kind]} if kind in _BETA_CONTENT_TYPES else part


def response_to_beta(response: dict[str, Any]) -> dict[str, Any]:
    """A GA response object as beta had it: modalities, output_audio_format and voice."""
    out = {k: v for k, v in response.items() if k not in ("output_modalities", "audio")}
    if "output_modalities" in response:
        out["modalities"] = _modalities_to_beta(response["output_modalities"])
    output = (response.get("audio") or {}).get("output") or {}
    if "format" in output:
        out["output_audio_format"] = format_to_beta(output["format"])
    if "voice" in output:
        out["voice"] = output["voice"]
    if isinstance(response.get("output"), list):
        out["output"] = [item_to_beta(i) if isinstance(i, dict) else i
                         for i in response["output"]]
    return out
