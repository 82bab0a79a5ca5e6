"""GET /openapi.json: the OpenAPI document, assembled from the request schemas in `schemas/`.

Request bodies are the very schemas the server validates against, so the document cannot
drift from what the server accepts.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from agent import __version__
from agent.request_validation import schema

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}},
}


def _body(name: str) -> dict[str, Any]:
    """A schema made self-contained for OpenAPI: local $defs move under components."""
    spec = copy.deepcopy(schema(name))
    for key in ("$schema", "$id", "x-parley-unsupported"):
        spec.pop(key, None)
    return spec


def _errors(*statuses: int) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    texts = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
             413: "body too large", 503: "a model is not installed"}
    return {str(s): {"description": texts[s], "content": content} for s in statuses}


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        return {k: (v.replace("#/$defs/", f"#/components/schemas/{prefix}")
                    if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, prefix))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


@functools.cache
def document() -> dict[str, Any]:
    components: dict[str, Any] = {"Error": ERROR}
    bodies = {}
    for name, title in (("openai/chat_completion_request", "ChatCompletionRequest"),
                        ("openai/speech_request", "SpeechRequest"),
                        ("openai/transcription_request", "TranscriptionFields"),
                        ("openai/realtime_client_secret_request",
                         "RealtimeClientSecretRequest")):
        spec = _body(name)
        prefix = f"{title}_"
        for def_name, definition in spec.pop("$defs", {}).items():
            components[prefix + def_name] = _rewrite_refs(definition, prefix)
        components[title] = _rewrite_refs(spec, prefix)
        bodies[title] = {"$ref": f"#/components/schemas/{title}"}
    fields = components.pop("TranscriptionFields")
    transcription_form = {
        "type": "object", "required": ["file", *fields["required"]],
        "properties": {"file": {"type": "string", "format": "binary"},
                       **fields["properties"]},
    }
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Parley", "version": __version__,
                 "description": "OpenAI-compatible audio APIs on local models."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": bodies["ChatCompletionRequest"]}}},
                "responses": {"200": {"description": "a completion, or an SSE stream",
                                      "content": {"application/json": {"schema": {}},
                                                  "text/event-stream": {"schema": {}}}},
                              **_errors(400, 401, 404, 413)}}},
            "/v1/audio/speech": {"post": {
                "operationId": "createSpeech",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": bodies["SpeechRequest"]}}},
                "responses": {"200": {"description": "audio bytes, or an SSE stream",
                                      "content": {"application/octet-stream": {"schema": {}},
                                                  "text/event-stream": {"schema": {}}}},
                              **_errors(400, 401, 404, 413)}}},
            "/v1/audio/transcriptions": {"post": {
                "operationId": "createTranscription",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": transcription_form}}},
                "responses": {"200": json_ok, **_errors(400, 401, 404, 413)}}},
            "/v1/realtime/client_secrets": {"post": {
                "operationId": "createRealtimeClientSecret",
                "description": "A short-lived secret a browser opens GET /v1/realtime with "
                               "(WebSocket; see the README).",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": bodies["RealtimeClientSecretRequest"]}}},
                "responses": {"200": json_ok, **_errors(400, 401, 413)}}},
            "/metrics": {"get": {
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_errors(401)}}},
            "/v1/models": {"get": {"operationId": "listModels",
                                   "responses": {"200": json_ok, **_errors(401)}}},
            "/healthz": {"get": {"operationId": "health", "security": [],
                                 "responses": {"200": json_ok}}},
        },
    }


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document())
