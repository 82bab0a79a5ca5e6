"""Who may open a Realtime session: API keys, ephemeral client secrets, and how browsers send them.

Servers connect with `Authorization: Bearer <API key or client secret>`. Browsers cannot set
headers on a WebSocket, so OpenAI's browser clients (openai-node's GA `OpenAIRealtimeWebSocket`,
openai-agents-js in the browser) put the credential in the subprotocol list instead:

    new WebSocket(url, ["realtime", "openai-insecure-api-key.<ek_... or key>"])

The handshake must then select one of the offered subprotocols or the browser drops the
connection, so Parley echoes `realtime` (never the one carrying the credential). Beta-era
clients also offer `openai-beta.realtime-v1`, the subprotocol form of `OpenAI-Beta:
realtime=v1`; either marks the connection as beta (OpenAI refuses both since the beta shut
down; Parley serves the beta shapes as aliases). Other offers (openai-agents-js adds
`openai-agents-sdk.<version>`) are ignored. A key in the query string (`?api_key=`) is not
accepted: URLs end up in access logs and browser history.

A client secret (`POST /v1/realtime/client_secrets`, or the beta `POST /v1/realtime/sessions`)
is, as at OpenAI, usable for any number of connections until `expires_at`; a session opened
before then runs on past it. It is bound to the session configuration it was created with.
The store keeps it under the SHA-256 of its value (a dump of Redis reveals no usable secret)
with the fingerprint of the API key that made it, never the key: at connect time the
fingerprint is matched against the configured keys, so a connection on a secret acts as that
key (tool permissions, ledgers) and removing the key from the configuration revokes its
secrets.

A failed check raises CredentialsError. OpenAI accepts the WebSocket handshake, sends an
`error` event (`invalid_request_error` / `invalid_api_key`) and closes with code 3000
("Unauthorized" in IANA's registry), reason `invalid_request_error.invalid_api_key`;
refusing the handshake with a 401 instead would leave a browser with nothing but close code
1006, since the WebSocket API hides the HTTP status. The endpoint does the same, accepting
with `CredentialsError.subprotocol`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from agent.api_keys import bearer_token, key_is_valid, principal_of, principals, scope_of
from agent.config import Settings
from agent.dispatch.types import key_fingerprint
from agent.errors import InvalidRequestError, ModelNotFoundError
from agent.model_ids import resolve_model
from agent.realtime.protocol import RealtimeError, new_session_id, parse_session, session_to_beta
from agent.realtime.session_config import apply_update, default_session, to_session_object
from agent.request_validation import validate
from agent.state.store import Store

REALTIME_SUBPROTOCOL = "realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
BETA_HEADER_VALUE = "realtime=v1"
SECRET_PREFIX = "ek_"
SECRET_KIND = "realtime_secret"
DEFAULT_MODEL = "gpt-realtime"
# Lifetimes of a client secret, in seconds: OpenAI's bounds and defaults (GA 10 minutes; the
# beta sessions endpoint documented one minute).
MIN_TTL_S, MAX_TTL_S = 10, 7200
DEFAULT_TTL_S = 600
BETA_DEFAULT_TTL_S = 60
CLOSE_UNAUTHORIZED = 3000
CLIENT_SECRET_SCHEMA = "openai/realtime_client_secret_request"

_HOW_TO_AUTHENTICATE = (
    "Send it as 'Authorization: Bearer KEY' or, from a browser, as the WebSocket subprotocol "
    "'openai-insecure-api-key.' followed by an ephemeral client secret (create one with "
    "POST /v1/realtime/client_secrets).")


@dataclass(frozen=True)
class Credentials:
    """What a Realtime connection authenticated as.

    api_key: the configured API key the connection acts as (also when it came with a client
    secret: the key that made the secret); None when authentication is disabled.
    key_id: key_fingerprint(api_key), for logs and ledgers ("anonymous" without a key).
    session: the GA session object the client secret was bound to (feed it to
    apply_update over default_session(settings, session["model"])), or None.
    subprotocol: the offered subprotocol to select in the handshake, or None.
    beta: the client speaks the beta shape (header or subprotocol)."""

    api_key: str | None
    key_id: str
    session: dict[str, Any] | None
    subprotocol: str | None
    beta: bool


class CredentialsError(RealtimeError):
    """No usable credential. Accept the handshake with `subprotocol`, send `to_event()`, then
    close with `close_code` and `close_reason`, as OpenAI does."""

    close_code = CLOSE_UNAUTHORIZED
    close_reason = "invalid_request_error.invalid_api_key"

    def __init__(self, message: str, *, subprotocol: str | None, beta: bool):
        super().__init__(message, code="invalid_api_key", type="invalid_request_error")
        self.subprotocol = subprotocol
        self.beta = beta


# --- the WebSocket handshake --------------------------------------------------------------

async def authenticate_websocket(scope: MutableMapping[str, Any], settings: Settings,
                                 store: Store) -> Credentials:
    """The credentials of an ASGI websocket `scope`, or CredentialsError.

    The Authorization header wins over a credential in the subprotocols. An `ek_` token is
    always looked up, even with auth_disabled: a secret that is unknown or expired is refused
    rather than silently opening a session without the configuration it was made for."""
    offered = offered_subprotocols(scope)
    subprotocol = choose_subprotocol(offered)
    beta = wants_beta(scope, offered)

    def refuse(message: str) -> CredentialsError:
        return CredentialsError(message, subprotocol=subprotocol, beta=beta)

    token = bearer_token(scope.get("headers") or []) or _subprotocol_token(offered)
    if token is not None and token.startswith(SECRET_PREFIX):
        record = await lookup_client_secret(token, store)
        if record is not None:
            api_key = _configured_key(record["key_id"], settings)
            if api_key is None and not settings.auth_disabled:
                raise refuse("The API key that created this client secret is no longer "
                             "accepted.")
            return Credentials(api_key, key_fingerprint(api_key), record["session"],
                               subprotocol, beta)
        if not key_is_valid(token, settings):
            raise refuse("The client secret is invalid or has expired. Create a new one with "
                         "POST /v1/realtime/client_secrets.")
    if settings.auth_disabled:
        api_key = principal_of(token, settings)
        return Credentials(api_key, key_fingerprint(api_key), None, subprotocol, beta)
    if token is None:
        message = f"You didn't provide an API key. {_HOW_TO_AUTHENTICATE}"
        if "api_key" in parse_qs(_query(scope)):
            message += " A key in the URL ('api_key') is not accepted: URLs end up in logs."
        raise refuse(message)
    principal = principal_of(token, settings)
    if principal is None:
        raise refuse("Incorrect API key provided.")
    scope_ = scope_of(principal, settings)
    if scope_ is not None and not scope_.allows("realtime"):
        raise refuse("This API key may not open realtime sessions (its endpoints scope).")
    return Credentials(principal, key_fingerprint(principal), None, subprotocol, beta)


def offered_subprotocols(scope: MutableMapping[str, Any]) -> list[str]:
    """The subprotocols the client offered, in its order (ASGI's `subprotocols`, else the
    Sec-WebSocket-Protocol headers)."""
    listed = scope.get("subprotocols")
    if listed is None:
        listed = [part for name, value in scope.get("headers") or []
                  if name.lower() == b"sec-websocket-protocol"
                  for part in value.decode("latin-1").split(",")]
    return [p.strip() for p in listed if isinstance(p, str) and p.strip()]


def choose_subprotocol(offered: list[str]) -> str | None:
    """`realtime` if offered, else the beta marker if offered; never one carrying a key."""
    for wanted in (REALTIME_SUBPROTOCOL, BETA_SUBPROTOCOL):
        if wanted in offered:
            return wanted
    return None


def wants_beta(scope: MutableMapping[str, Any], offered: list[str]) -> bool:
    """`OpenAI-Beta: realtime=v1` (among comma-separated values) or its subprotocol form."""
    if BETA_SUBPROTOCOL in offered:
        return True
    for name, value in scope.get("headers") or []:
        if name.lower() == b"openai-beta":
            values = value.decode("latin-1").split(",")
            if any(v.strip().lower() == BETA_HEADER_VALUE for v in values):
                return True
    return False


def _subprotocol_token(offered: list[str]) -> str | None:
    for protocol in offered:
        token = protocol.removeprefix(KEY_SUBPROTOCOL_PREFIX)
        if token and token != protocol:
            return token
    return None


def _query(scope: MutableMapping[str, Any]) -> str:
    raw = scope.get("query_string") or b""
    return raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)


def _configured_key(key_id: str, settings: Settings) -> str | None:
    """The configured principal (agent.api_keys) with this fingerprint (every one
    compared, in constant time)."""
    found = None
    for principal in principals(settings):
        if hmac.compare_digest(key_fingerprint(principal), key_id):
            found = principal
    return found


# --- client secrets -----------------------------------------------------------------------

def _secret_ident(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def lookup_client_secret(value: str, store: Store) -> dict[str, Any] | None:
    """The stored record {key_id, session, created_at, expires_at} of a live client secret."""
    record = await store.get_json(SECRET_KIND, _secret_ident(value))
    if not isinstance(record, dict) or record.get("expires_at", 0) <= time.time():
        return None
    return record


async def _mint(session: dict[str, Any], seconds: int, store: Store,
                api_key: str | None) -> tuple[str, int]:
    value = SECRET_PREFIX + secrets.token_hex(16)
    created_at = int(time.time())
    expires_at = created_at + seconds
    record = {"key_id": key_fingerprint(api_key), "session": session,
              "created_at": created_at, "expires_at": expires_at}
    # The store forgets it when it expires: the TTL is what is left of its lifetime.
    await store.put_json(SECRET_KIND, _secret_ident(value), record,
                         ttl_s=expires_at - time.time())
    return value, expires_at


async def create_client_secret(body: Any, settings: Settings, store: Store,
                               api_key: str | None) -> dict[str, Any]:
    """POST /v1/realtime/client_secrets: {value, expires_at, session} for a GA request body
    {expires_after?: {anchor, seconds}, session?: {type: "realtime", ...}}.
    Bad input raises InvalidRequestError (or ModelNotFoundError) naming the parameter."""
    validate(CLIENT_SECRET_SCHEMA, body)
    seconds = _lifetime(body.get("expires_after"), "expires_after", DEFAULT_TTL_S)
    session = _bound_session(body.get("session", {"type": "realtime"}), settings, beta=False)
    value, expires_at = await _mint(session, seconds, store, api_key)
    return {"value": value, "expires_at": expires_at, "session": session}


async def create_beta_session(body: Any, settings: Settings, store: Store,
                              api_key: str | None) -> dict[str, Any]:
    """POST /v1/realtime/sessions (beta): the session parameters at the top level, plus
    `client_secret.expires_after`; returns the beta session object with
    `client_secret: {value, expires_at}`."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.",
                                  code="invalid_request_body")
    params = dict(body)
    client_secret = params.pop("client_secret", None)
    if client_secret is not None and not isinstance(client_secret, dict):
        raise InvalidRequestError("Invalid type for 'client_secret': expected an object.",
                                  param="client_secret", code="invalid_type")
    seconds = _lifetime((client_secret or {}).get("expires_after"),
                        "client_secret.expires_after", BETA_DEFAULT_TTL_S)
    session = _bound_session(params, settings, beta=True)
    value, expires_at = await _mint(session, seconds, store, api_key)
    return {**session_to_beta(session),
            "client_secret": {"value": value, "expires_at": expires_at}}


def _lifetime(expires_after: Any, param: str, default: int) -> int:
    if expires_after is None:
        return default
    if not isinstance(expires_after, dict):
        raise InvalidRequestError(f"Invalid type for '{param}': expected an object.",
                                  param=param, code="invalid_type")
    for key in expires_after:
        if key not in ("anchor", "seconds"):
            raise InvalidRequestError(f"Unknown parameter: '{param}.{key}'.",
                                      param=f"{param}.{key}", code="unknown_parameter")
    anchor = expires_after.get("anchor", "created_at")
    if anchor != "created_at":
        raise InvalidRequestError(f"Invalid value for '{param}.anchor': only 'created_at' is "
                                  "supported.", param=f"{param}.anchor", code="invalid_value")
    seconds = expires_after.get("seconds", default)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or seconds != int(seconds) or not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise InvalidRequestError(f"Invalid value for '{param}.seconds': expected an integer "
                                  f"from {MIN_TTL_S} to {MAX_TTL_S}.",
                                  param=f"{param}.seconds", code="invalid_value")
    return int(seconds)


def _bound_session(params: Any, settings: Settings, *, beta: bool) -> dict[str, Any]:
    """The effective GA session object a secret is bound to: the request's configuration
    checked as a session.update would be, over Parley's defaults for a new session."""
    if isinstance(params, dict) and params.get("type") == "transcription":
        raise InvalidRequestError("Transcription sessions are not supported by Parley; create "
                                  "a realtime session with audio.input.transcription.",
                                  param="session.type", code="invalid_value")
    try:
        session = parse_session(params, beta=beta)
        model = session.get("model") or DEFAULT_MODEL
        resolve_model(model, settings, "chat")
        config = apply_update(default_session(settings, model), session, beta=beta)
    except RealtimeError as exc:
        raise _request_error(exc, beta) from None
    except ModelNotFoundError as exc:
        exc.param = "model" if beta else "session.model"
        raise
    return to_session_object(config, session_id=new_session_id(), beta=False)


def _request_error(exc: RealtimeError, beta: bool) -> InvalidRequestError:
    """A session error as a 400. Beta bodies carry the session at the top level, so
    `session.voice` is named `voice` there."""
    message, param = exc.message, exc.param
    if beta:
        message = message.replace("'session.", "'")
        param = param.removeprefix("session.") if param else param
    return InvalidRequestError(message, param=param, code=exc.code)
