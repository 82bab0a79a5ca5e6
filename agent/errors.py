"""Typed errors. Every part raises these; the front turns them into OpenAI's error shape.

Each carries what the HTTP layer needs (status, type, code, param) so that the
translation happens in one place and no stage has to know about HTTP.
"""

from __future__ import annotations


def error_object(message: str, type: str = "server_error", param: str | None = None,
                 code: str | None = None) -> dict:
    """OpenAI's error shape, {"error": {message, type, param, code}}: built here only (HTTP
    bodies, realtime `error` events, the 401 of the key check all take it from here)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ParleyError(Exception):
    """Base of every error Parley reports to a client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        """The OpenAI error object: {"error": {message, type, param, code}}."""
        return error_object(self.message, self.type, self.param, self.code)


class InvalidRequestError(ParleyError):
    status = 400
    type = "invalid_request_error"


class AudioError(InvalidRequestError):
    """Audio that cannot be decoded or encoded: empty, truncated, not audio, too long."""

    code = "invalid_audio"


class VoiceError(InvalidRequestError):
    """An unknown voice name."""

    code = "invalid_voice"


class ModelMissingError(ParleyError):
    """A model's files are not installed. The message names the package to install."""

    status = 503
    type = "server_error"
    code = "model_not_installed"


class ModelUnavailableError(ParleyError):
    """A loaded model cannot run: a decode step failed (out of GPU memory, a kernel that
    raised). The request ends; the decoder keeps serving the others."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class StoreUnavailableError(ParleyError):
    """The state store cannot be reached. Requests that need it get this 503; nothing
    they asked for was half-done in the store."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class ModelNotFoundError(ParleyError):
    """A request names a model id Parley does not serve."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(ParleyError):
    """A path Parley serves only when configured (the Twilio webhook without its token)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ForbiddenError(ParleyError):
    """A request whose signature does not prove where it came from."""

    status = 403
    type = "invalid_request_error"
    code = "invalid_signature"


class ConfigError(ParleyError):
    """A setting is malformed. Raised at start-up, never during a request."""

    code = "invalid_config"


def client_error(exc: BaseException) -> ParleyError | None:
    """The ParleyError behind `exc`, looking inside task-group exception groups."""
    if isinstance(exc, ParleyError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := client_error(inner)) is not None:
                return found
    return None
