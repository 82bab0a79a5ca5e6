"""POST /twilio/voice: Twilio's request when a call comes in, answered with TwiML that
connects the call to Parley's media stream.

Twilio signs each request (X-Twilio-Signature: an HMAC of the URL it called and the form
parameters, keyed by the account's auth token); the `twilio` package's RequestValidator
checks it. The TwiML's <Stream> carries a stream token bound to the CallSid
(agent.phone.tokens), so only a call announced here can open a media stream.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from agent.config import Settings
from agent.errors import ForbiddenError, InvalidRequestError, NotFoundError
from agent.phone import tokens

MEDIA_PATH = "/twilio/media"


def public_url(request: Request, settings: Settings) -> str:
    """The URL Twilio called: as received, or under PARLEY_PUBLIC_URL behind a proxy."""
    if not settings.public_url:
        return str(request.url)
    query = f"?{request.url.query}" if request.url.query else ""
    return settings.public_url.rstrip("/") + request.url.path + query


def media_url(called: str) -> str:
    """The media stream's URL beside the webhook's: wss:// for https, ws:// for http."""
    scheme, _, rest = called.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'wss' if scheme == 'https' else 'ws'}://{host}{MEDIA_PATH}"


async def twilio_voice(request: Request) -> Response:
    settings: Settings = request.app.state.runtime.settings
    secret = settings.twilio_auth_token
    if not secret:
        raise NotFoundError("Twilio calls are not enabled on this server "
                            "(set PARLEY_TWILIO_AUTH_TOKEN)")
    form = await request.form()
    params = {key: str(value) for key, value in form.items()}
    called = public_url(request, settings)
    signature = request.headers.get("x-twilio-signature", "")
    if not signature or not RequestValidator(secret).validate(called, params, signature):
        raise ForbiddenError("the X-Twilio-Signature header does not match this request")
    call_sid = params.get("CallSid")
    if not call_sid:
        raise InvalidRequestError("the webhook request has no CallSid", param="CallSid")
    answer = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=media_url(called))
    stream.parameter(name="token",
                     value=tokens.issue(secret, call_sid, settings.twilio_token_ttl_s))
    for name in ("From", "To"):
        if params.get(name):
            stream.parameter(name=name.lower(), value=params[name])
    answer.append(connect)
    return Response(str(answer), media_type="text/xml")
