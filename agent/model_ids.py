"""The model ids Parley answers to, and the local model each one runs.

OpenAI retired the GPT-4o audio preview ids in 2026; code that still sends them can point at
Parley unchanged. Every id a client may send maps to one local model by role: an LLM name
(`smollm2`, `qwen2.5-coder-0.5b`, a .gguf path) for chat and realtime, or the TTS / ASR
engine for the speech endpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.config import Settings
from agent.errors import ModelNotFoundError

# Undated ids; their dated variants (…-YYYY-MM-DD) are accepted too.
CHAT_IDS = ("gpt-4o-audio-preview", "gpt-4o-mini-audio-preview", "gpt-audio", "gpt-audio-mini",
            "gpt-audio-1.5")
REALTIME_IDS = ("gpt-realtime", "gpt-realtime-mini", "gpt-4o-realtime-preview",
                "gpt-4o-mini-realtime-preview")
SPEECH_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
TRANSCRIBE_IDS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")
LOCAL_LLMS = ("smollm2", "qwen2.5-coder-0.5b")

_DATED = re.compile(r"^(?P<base>.+?)-\d{4}-\d{2}-\d{2}$")
CREATED = 1764374400  # 2025-11-29: a fixed "created" for the listing


@dataclass(frozen=True)
class ServedModel:
    id: str
    role: str      # "chat" (also realtime), "speech", "transcription"
    target: str    # the local LLM for chat; "tts" / "asr" for the speech engines


def _base(model_id: str) -> str:
    match = _DATED.match(model_id)
    return match.group("base") if match else model_id


def resolve_model(model_id: str, settings: Settings, role: str) -> ServedModel:
    """The local model behind `model_id` for an endpoint of `role`, or a 404."""
    base = _base(model_id)
    extra = settings.model_aliases.get(model_id) or settings.model_aliases.get(base)
    if role == "chat":
        if extra:
            return ServedModel(model_id, "chat", extra)
        if base in CHAT_IDS or base in REALTIME_IDS:
            return ServedModel(model_id, "chat", settings.llm_model)
        if model_id in LOCAL_LLMS or model_id == settings.llm_model:
            return ServedModel(model_id, "chat", model_id)
    elif role == "speech" and (base in SPEECH_IDS or extra == "tts"):
        return ServedModel(model_id, "speech", "tts")
    elif role == "transcription" and (base in TRANSCRIBE_IDS or extra == "asr"):
        return ServedModel(model_id, "transcription", "asr")
    raise ModelNotFoundError(
        f"The model `{model_id}` does not exist or you do not have access to it.",
        param="model")


def listed_models(settings: Settings) -> list[dict]:
    """GET /v1/models: the undated ids, configured aliases and the local model names."""
    ids = [*CHAT_IDS, *REALTIME_IDS, *SPEECH_IDS, *TRANSCRIBE_IDS, *LOCAL_LLMS,
           *settings.model_aliases]
    return [{"id": i, "object": "model", "created": CREATED, "owned_by": "parley"}
            for i in dict.fromkeys(ids)]
