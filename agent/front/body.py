"""Reading request bodies within a size limit, and JSON that fails with OpenAI's 400."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from agent.errors import InvalidRequestError, ParleyError


class PayloadTooLarge(ParleyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


def body_limit(request: Request) -> int:
    """Base64 makes audio 4/3 larger; leave room for the rest of the JSON."""
    return request.app.state.settings.max_audio_bytes * 4 // 3 + (1 << 20)


async def read_body(request: Request) -> bytes:
    limit = body_limit(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    return bytes(received)


async def read_json(request: Request) -> Any:
    raw = await read_body(request)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json") from None
