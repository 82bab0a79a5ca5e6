"""Realtime sessions over WebSocket (OpenAI's Realtime protocol, GA and beta shapes).

protocol: parsing, validation and beta↔GA translation of events; session_config: the
effective configuration of a session and how session.update changes it.
"""

from agent.realtime.protocol import (
    RealtimeError,
    parse_client_event,
    server_event,
    to_client,
)
from agent.realtime.session_config import (
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

__all__ = [
    "AudioFormat",
    "RealtimeError",
    "SessionConfig",
    "Transcription",
    "TurnDetection",
    "apply_update",
    "default_session",
    "for_response",
    "parse_client_event",
    "server_event",
    "to_client",
    "to_response_object",
    "to_session_object",
]
