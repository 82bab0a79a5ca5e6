"""Stream tokens: the voice webhook's proof, carried in the TwiML, that a media stream
belongs to a call Twilio announced with a valid signature.

A token is `payload.signature`: the payload names the CallSid, an expiry and a nonce
(base64url JSON); the signature is an HMAC-SHA256 of it under the Twilio auth token. A
media stream presents it in its `start` message; it is good for one stream of that call,
until it expires (the nonce is claimed in the state store, so a replay on any replica
fails).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from agent.state.store import Store

CLAIM_KIND = "twilio-stream-token"


class TokenRefused(Exception):
    """Why a stream's token is not accepted (said in the server's log, not to the peer)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), b"twilio-stream:" + payload.encode(),
                         hashlib.sha256).digest())


def issue(secret: str, call_sid: str, ttl_s: float, *, now: float | None = None) -> str:
    """A token for one media stream of call `call_sid`, good for `ttl_s` seconds."""
    expires = (time.time() if now is None else now) + ttl_s
    payload = _b64(json.dumps({"call": call_sid, "exp": round(expires, 3),
                               "nonce": secrets.token_urlsafe(12)},
                              separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}"


def check(secret: str, token: str, call_sid: str, *, now: float | None = None
          ) -> tuple[str, float]:
    """The token's (nonce, expiry) when it is genuine, unexpired and for `call_sid`;
    TokenRefused otherwise. Use `redeem` to make it single-use."""
    payload, _, signature = token.partition(".")
    if not payload or not hmac.compare_digest(signature, _sign(secret, payload)):
        raise TokenRefused("the stream token's signature is wrong")
    try:
        claims = json.loads(_unb64(payload))
        call, expires, nonce = claims["call"], float(claims["exp"]), str(claims["nonce"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenRefused("the stream token is malformed") from exc
    if call != call_sid:
        raise TokenRefused("the stream token is for another call")
    if expires <= (time.time() if now is None else now):
        raise TokenRefused("the stream token has expired")
    return nonce, expires


async def redeem(store: Store, secret: str, token: str, call_sid: str) -> None:
    """Accept `token` for `call_sid` once: a second stream with it is refused."""
    nonce, expires = check(secret, token, call_sid)
    if not await store.claim(CLAIM_KIND, nonce, ttl_s=max(expires - time.time(), 1.0)):
        raise TokenRefused("the stream token was used already")
