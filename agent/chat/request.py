"""A validated chat request turned into what the pipeline needs.

The JSON Schema (`schemas/openai/chat_completion_request.json`) has already checked shapes;
this module checks what a schema cannot (combinations of fields, voices, the model id) and
gathers the options in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config import Settings
from agent.decoder.sampling import SamplingParams
from agent.errors import InvalidRequestError, VoiceError
from agent.model_ids import ServedModel, resolve_model

MAX_N = 8


@dataclass(frozen=True)
class AudioOutput:
    voice: str
    format: str
    speed: float


@dataclass
class ChatRequest:
    model: ServedModel
    messages: list[dict[str, Any]]
    audio: AudioOutput | None
    stream: bool
    include_usage: bool
    n: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    max_tokens: int | None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    legacy_functions: bool = False  # the request used `functions`: answer `function_call`

    @property
    def tool_mode(self) -> str | None:
        """None (no tools, no grammar), "none" (tools exist but the reply is words only),
        "auto", "required", or the one tool name the reply must call."""
        if not self.tools:
            return None
        choice = self.tool_choice
        if isinstance(choice, dict):
            return (choice.get("function") or choice)["name"]
        if choice in (None, "auto"):
            return "auto"
        return str(choice)

    def sampling(self, choice: int) -> SamplingParams:
        """Sampling for choice `choice`: n>1 with a seed gives n different, repeatable runs."""
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=seed,
                              stop=tuple(self.stop), max_tokens=self.max_tokens or 1)


def parse_chat_request(body: dict[str, Any], settings: Settings,
                       voices: tuple[str, ...]) -> ChatRequest:
    model = resolve_model(body["model"], settings, "chat")
    modalities = body.get("modalities") or ["text"]
    audio = _audio_output(body, modalities, settings, voices)
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if body.get("max_completion_tokens") and body.get("max_tokens") \
            and body["max_completion_tokens"] != body["max_tokens"]:
        raise InvalidRequestError(
            "max_tokens and max_completion_tokens disagree; send only max_completion_tokens.",
            param="max_tokens", code="invalid_value")
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options and not stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true.",
                                  param="stream_options", code="invalid_value")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    tools, tool_choice, parallel, legacy = _tools(body)
    return ChatRequest(
        model=model,
        messages=body["messages"],
        audio=audio,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        n=body.get("n") or 1,
        temperature=settings.default_temperature if temperature is None
        else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=body.get("seed"),
        stop=stop_list,
        max_tokens=max_tokens,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        legacy_functions=legacy,
    )


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], Any, bool, bool]:
    """(tools, tool_choice, parallel, legacy): the legacy `functions`/`function_call` pair
    becomes tools with one call at most, as OpenAI's old API answered."""
    if body.get("functions") and body.get("tools"):
        raise InvalidRequestError("send either tools or the legacy functions, not both.",
                                  param="functions", code="invalid_value")
    if body.get("functions"):
        tools = [{"type": "function", "function": f} for f in body["functions"]]
        return tools, body.get("function_call"), False, True
    parallel = body.get("parallel_tool_calls")
    return list(body.get("tools") or []), body.get("tool_choice"), parallel is not False, False


def _audio_output(body: dict[str, Any], modalities: list[str], settings: Settings,
                  voices: tuple[str, ...]) -> AudioOutput | None:
    audio = body.get("audio")
    if "audio" not in modalities:
        if audio:
            raise InvalidRequestError(
                "audio output options were given, but modalities does not include 'audio'; "
                "use modalities: [\"text\", \"audio\"].", param="modalities", code="invalid_value")
        if body.get("speed") is not None:
            raise InvalidRequestError("speed applies to audio output; add 'audio' to "
                                      "modalities.", param="speed", code="invalid_value")
        return None
    if "text" not in modalities:
        raise InvalidRequestError("modalities must include 'text' ([\"text\", \"audio\"]).",
                                  param="modalities", code="invalid_value")
    if not audio:
        raise InvalidRequestError(
            "Audio output requires the 'audio' parameter: {\"voice\": ..., \"format\": ...}.",
            param="audio", code="missing_required_parameter")
    voice = audio["voice"]
    name = voice["id"] if isinstance(voice, dict) else voice
    if name not in voices:
        raise VoiceError(f"Unknown voice '{name}'. Available voices: {', '.join(voices)}.",
                         param="audio.voice")
    top, inner = body.get("speed"), audio.get("speed")
    if top is not None and inner is not None and float(top) != float(inner):
        raise InvalidRequestError("speed is given twice with different values (speed and "
                                  "audio.speed); send one.", param="speed", code="invalid_value")
    speed = inner if inner is not None else top
    return AudioOutput(voice=name, format=audio["format"],
                       speed=1.0 if speed is None else float(speed))
