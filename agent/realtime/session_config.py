"""The effective configuration of one Realtime session, and how updates change it.

`SessionConfig` is immutable: `apply_update` returns a new one, so a response that started
under the old configuration keeps it to the end while the next one sees the update.
Updates arrive GA-shaped and schema-valid (agent.realtime.protocol); what is left here are
the checks a schema cannot make (voices this server has, the voice lock, tool names) and
the merge rules: only the fields present change, and a nested object such as
turn_detection is merged into the current one when it keeps its type.

Semantic VAD. Parley has no semantic end-of-turn model, so `semantic_vad` runs the same
server VAD with a silence length chosen by eagerness (SEMANTIC_SILENCE_MS). OpenAI's
eagerness caps the wait at 8 s / 4 s / 2 s (low/medium/high) but usually answers much
sooner; these silences keep the same order around Parley's 500 ms server_vad default.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from agent.config import Settings
from agent.json_schema import validator_class
from agent.realtime.protocol import RealtimeError, beta_param, session_to_beta

DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant. Your replies are spoken aloud: answer in short, "
    "natural sentences, without lists, markdown or emoji."
)
# Speech shorter than this does not interrupt the assistant ("uh-huh", "okay", a cough).
DEFAULT_BACKCHANNEL_MS = 500
SEMANTIC_SILENCE_MS = {"high": 300, "medium": 700, "auto": 700, "low": 1200}

_KINDS = {"audio/pcm": "pcm16", "audio/pcmu": "pcmu", "audio/pcma": "pcma",
          "audio/opus": "opus"}
_RATES = {"pcm16": 24000, "pcmu": 8000, "pcma": 8000, "opus": 48000}
# The names agent.audio uses for the same formats.
_CODECS = {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw", "opus": "opus"}


@dataclass(frozen=True)
class AudioFormat:
    """A wire format: kind "pcm16" | "pcmu" | "pcma" | "opus" and its sample rate."""

    kind: str
    rate: int

    @classmethod
    def from_ga(cls, fmt: dict[str, Any]) -> AudioFormat:
        kind = _KINDS[fmt["type"]]
        return cls(kind, _RATES[kind])

    def to_ga(self) -> dict[str, Any]:
        mime = next(m for m, k in _KINDS.items() if k == self.kind)
        return {"type": mime, "rate": self.rate} if self.kind == "pcm16" else {"type": mime}

    @property
    def codec(self) -> str:
        """The name agent.audio's decoders and encoders know: pcm16, g711_ulaw, …, opus."""
        return _CODECS[self.kind]


PCM16_24K = AudioFormat("pcm16", 24000)


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD settings (OpenAI's meanings). For semantic_vad, `eagerness` is what the
    client asked for and `silence_duration_ms` what Parley runs with."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: str | None = None

    def to_ga(self) -> dict[str, Any]:
        if self.type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness or "auto",
                    "create_response": self.create_response,
                    "interrupt_response": self.interrupt_response}
        return {"type": "server_vad", "threshold": self.threshold,
                "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms,
                "create_response": self.create_response,
                "interrupt_response": self.interrupt_response,
                "idle_timeout_ms": self.idle_timeout_ms}


@dataclass(frozen=True)
class Transcription:
    """Input transcription events are on. `model` is only echoed: Parley's ASR does it."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None

    def to_ga(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SessionConfig:
    """What one session runs with. Build it with `default_session`."""

    model: str
    instructions: str = DEFAULT_INSTRUCTIONS
    output_modalities: tuple[str, ...] = ("audio",)
    input_format: AudioFormat = PCM16_24K
    output_format: AudioFormat = PCM16_24K
    voice: str = "alloy"
    speed: float = 1.0
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    transcription: Transcription | None = None
    noise_reduction: str | None = None          # "near_field" | "far_field"; Parley ignores it
    tools: tuple[dict[str, Any], ...] = ()      # flat realtime shape: {type, name, ...}
    tool_choice: str | dict[str, Any] = "auto"
    max_output_tokens: int | Literal["inf"] = "inf"
    temperature: float = 0.7
    # Parley options (session.parley)
    server_tools: bool | None = None            # None: the server's tools config decides
    backchannel_ms: int = DEFAULT_BACKCHANNEL_MS
    debug_events: bool = False
    speculate: bool = True                      # start replies in the end-of-turn silence
    # What this server offers; not part of the session a client sees.
    voices: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    vad_defaults: TurnDetection = field(default_factory=TurnDetection, compare=False,
                                        repr=False)

    @property
    def audio_output(self) -> bool:
        return "audio" in self.output_modalities

    def output_token_limit(self, cap: int) -> int:
        """Tokens one response may generate: the session's limit, `cap` for "inf"."""
        return cap if self.max_output_tokens == "inf" else min(cap, self.max_output_tokens)


def default_session(settings: Settings, model: str) -> SessionConfig:
    """A new session: OpenAI's defaults, Parley's voice, temperature and VAD settings."""
    vad = TurnDetection(threshold=settings.vad_threshold,
                        prefix_padding_ms=settings.vad_prefix_padding_ms,
                        silence_duration_ms=settings.vad_silence_duration_ms)
    return SessionConfig(model=model, voice=settings.default_voice, turn_detection=vad,
                         temperature=settings.default_temperature,
                         voices=frozenset(settings.voice_map()), vad_defaults=vad)


Where = Callable[[str], str]


def apply_update(config: SessionConfig, session: dict[str, Any], *, voice_locked: bool = False,
                 beta: bool = False, event_id: str | None = None) -> SessionConfig:
    """`config` with a GA-shaped, schema-valid session.update `session` merged in.

    voice_locked: the assistant has spoken in this session, so the voice may not change.
    beta: name parameters in errors as a beta client wrote them. Errors carry `event_id`.
    `model` is ignored: a session keeps the model it connected with."""
    where = _namer("session", beta)
    try:
        audio = session.get("audio") or {}
        changes = {
            **_common_changes(config, session, where),
            **_input_changes(config, audio.get("input") or {}),
            **_output_changes(config, audio.get("output") or {}, voice_locked, where),
            **_parley_changes(session.get("parley") or {}),
        }
    except RealtimeError as exc:
        exc.event_id = event_id
        raise
    return dataclasses.replace(config, **changes)


def for_response(config: SessionConfig, params: dict[str, Any] | None, *,
                 voice_locked: bool = False, beta: bool = False,
                 event_id: str | None = None) -> SessionConfig:
    """The configuration one response runs with: the session's, with the overrides of a
    response.create `response` (instructions, output_modalities, audio.output.format and
    voice, tools, tool_choice, max_output_tokens, temperature). conversation, input and
    metadata are the caller's to handle."""
    if not params:
        return config
    where = _namer("response", beta)
    try:
        output = (params.get("audio") or {}).get("output") or {}
        changes = {**_common_changes(config, params, where),
                   **_output_changes(config, output, voice_locked, where)}
    except RealtimeError as exc:
        exc.event_id = event_id
        raise
    return dataclasses.replace(config, **changes)


def _namer(prefix: str, beta: bool) -> Where:
    def where(path: str) -> str:
        full = f"{prefix}.{path}"
        return beta_param(full) if beta else full
    return where


def _common_changes(config: SessionConfig, body: dict[str, Any], where: Where) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "instructions" in body:
        changes["instructions"] = body["instructions"]
    if "output_modalities" in body:
        changes["output_modalities"] = tuple(body["output_modalities"])
    if "tools" in body:
        changes["tools"] = _tools(body["tools"], where)
    if "tool_choice" in body:
        choice = body["tool_choice"]
        changes["tool_choice"] = dict(choice) if isinstance(choice, dict) else choice
    if "max_output_tokens" in body:
        changes["max_output_tokens"] = body["max_output_tokens"]
    if "temperature" in body:
        changes["temperature"] = float(body["temperature"])
    return changes


def _tools(tools: list[dict[str, Any]], where: Where) -> tuple[dict[str, Any], ...]:
    seen: set[str] = set()
    out = []
    for index, tool in enumerate(tools):
        name = tool["name"]
        if name in seen:
            raise RealtimeError(f"Invalid value for '{where(f'tools[{index}].name')}': "
                                f"two tools are named '{name}'.",
                                param=where(f"tools[{index}].name"))
        seen.add(name)
        parameters = tool.get("parameters")
        if parameters is not None:
            _check_parameters(parameters, where(f"tools[{index}].parameters"))
        out.append({"type": "function", **copy.deepcopy(tool)})
    return tuple(out)


def _check_parameters(parameters: dict[str, Any], param: str) -> None:
    # The decoder turns these into a grammar; a broken schema must fail here, not mid-turn.
    try:
        validator_class(parameters)
    except jsonschema.SchemaError as exc:
        raise RealtimeError(f"Invalid value for '{param}': not a valid JSON Schema "
                            f"({exc.message[:200]}).", param=param) from None


def _input_changes(config: SessionConfig, audio_in: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "format" in audio_in:
        changes["input_format"] = AudioFormat.from_ga(audio_in["format"])
    if "turn_detection" in audio_in:
        changes["turn_detection"] = _turn_detection(config, audio_in["turn_detection"])
    if "transcription" in audio_in:
        given = audio_in["transcription"]
        current = config.transcription or Transcription()
        changes["transcription"] = None if given is None else dataclasses.replace(
            current, **{k: given[k] for k in ("model", "language", "prompt") if k in given})
    if "noise_reduction" in audio_in:
        given = audio_in["noise_reduction"]
        changes["noise_reduction"] = None if given is None else (
            given.get("type") or config.noise_reduction or "near_field")
    return changes


def _turn_detection(config: SessionConfig, given: dict[str, Any] | None) -> TurnDetection | None:
    if given is None:
        return None
    current = config.turn_detection
    kind = given["type"]
    # Same kind: merge into the current settings. New kind: start from the defaults.
    base = current if current is not None and current.type == kind else \
        dataclasses.replace(config.vad_defaults, type=kind, eagerness=None)
    names = ("threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
             "interrupt_response", "idle_timeout_ms")
    fields: dict[str, Any] = {k: given[k] for k in names if k in given}
    if kind == "semantic_vad":
        eagerness = given.get("eagerness", base.eagerness or "auto")
        fields.update(eagerness=eagerness, silence_duration_ms=SEMANTIC_SILENCE_MS[eagerness],
                      idle_timeout_ms=None)
    return dataclasses.replace(base, **fields)


def _output_changes(config: SessionConfig, audio_out: dict[str, Any], voice_locked: bool,
                    where: Where) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "format" in audio_out:
        changes["output_format"] = AudioFormat.from_ga(audio_out["format"])
    if "voice" in audio_out:
        changes["voice"] = _voice(config, audio_out["voice"], voice_locked,
                                  where("audio.output.voice"))
    if "speed" in audio_out:
        changes["speed"] = float(audio_out["speed"])
    return changes


def _voice(config: SessionConfig, given: str | dict[str, Any], locked: bool, param: str) -> str:
    name = given["id"] if isinstance(given, dict) else given
    if config.voices and name not in config.voices:
        raise RealtimeError(f"Invalid value for '{param}': unknown voice '{name[:80]}'. "
                            f"Supported values are: {', '.join(sorted(config.voices))}.",
                            param=param)
    if locked and name != config.voice:
        raise RealtimeError("Cannot update a conversation's voice if assistant audio is "
                            "present.", code="cannot_update_voice", param=param)
    return name


def _parley_changes(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("server_tools", "backchannel_ms", "debug_events",
                                    "speculate") if k in options}


# --- what the client sees -----------------------------------------------------------------

def to_session_object(config: SessionConfig, *, session_id: str, beta: bool,
                      expires_at: int | None = None) -> dict[str, Any]:
    """The `session` of session.created / session.updated (and of a client secret)."""
    session: dict[str, Any] = {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": config.model,
        "output_modalities": list(config.output_modalities),
        "instructions": config.instructions,
        "audio": {
            "input": {
                "format": config.input_format.to_ga(),
                "transcription": config.transcription and config.transcription.to_ga(),
                "noise_reduction": config.noise_reduction and {"type": config.noise_reduction},
                "turn_detection": config.turn_detection and config.turn_detection.to_ga(),
            },
            "output": {"format": config.output_format.to_ga(), "voice": config.voice,
                       "speed": config.speed},
        },
        "tools": [copy.deepcopy(t) for t in config.tools],
        "tool_choice": copy.deepcopy(config.tool_choice),
        "max_output_tokens": config.max_output_tokens,
        "temperature": config.temperature,
        "parley": {"server_tools": config.server_tools, "backchannel_ms": config.backchannel_ms,
                   "debug_events": config.debug_events, "speculate": config.speculate},
    }
    if expires_at is not None:
        session["expires_at"] = expires_at
    return session_to_beta(session) if beta else session


def to_response_object(config: SessionConfig, *, response_id: str,
                       status: str = "in_progress", output: list[dict[str, Any]] | None = None,
                       conversation_id: str | None = None,
                       status_details: dict[str, Any] | None = None,
                       usage: dict[str, Any] | None = None,
                       metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The GA `response` of response.created / response.done for a response run with
    `config` (see for_response); protocol.to_client reshapes it for beta clients."""
    return {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": status_details,
        "output": list(output or []),
        "conversation_id": conversation_id,
        "output_modalities": list(config.output_modalities),
        "max_output_tokens": config.max_output_tokens,
        "temperature": config.temperature,
        "audio": {"output": {"format": config.output_format.to_ga(), "voice": config.voice}},
        "usage": usage,
        "metadata": metadata,
    }
