"""The phone bridge's parts that need no call: stream tokens, the mark ledger, the voice
webhook (signatures checked by the real `twilio` RequestValidator), the per-number
settings and the message schema."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from agent.config import Settings
from agent.errors import ParleyError
from agent.phone import tokens
from agent.phone.media import call_settings, inbound_problem
from agent.phone.playback import MarkLedger
from agent.phone.webhook import media_url, twilio_voice

SECRET = "auth-token"
CALL = "CA" + "0" * 32


# -- tokens -----------------------------------------------------------------------------------

def test_a_token_is_good_for_its_call_until_it_expires() -> None:
    token = tokens.issue(SECRET, CALL, 300, now=1000.0)
    nonce, expires = tokens.check(SECRET, token, CALL, now=1299.0)
    assert nonce and expires == 1300.0
    with pytest.raises(tokens.TokenRefused, match="expired"):
        tokens.check(SECRET, token, CALL, now=1300.5)
    with pytest.raises(tokens.TokenRefused, match="another call"):
        tokens.check(SECRET, token, "CA" + "1" * 32, now=1000.0)


@pytest.mark.parametrize("forge", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),   # signature changed
    lambda t: "e30" + t[t.index("."):],                              # payload swapped
    lambda t: "",
    lambda t: t.split(".")[0],
])
def test_a_forged_token_is_refused(forge: Any) -> None:
    token = tokens.issue(SECRET, CALL, 300)
    with pytest.raises(tokens.TokenRefused):
        tokens.check(SECRET, forge(token), CALL)
    with pytest.raises(tokens.TokenRefused):
        tokens.check("another-secret", token, CALL)


class ClaimStore:
    def __init__(self) -> None:
        self.claimed: set[str] = set()

    async def claim(self, kind: str, ident: str, ttl_s: float | None = None) -> bool:
        if ident in self.claimed:
            return False
        self.claimed.add(ident)
        return True


async def test_a_token_opens_one_stream_only() -> None:
    store: Any = ClaimStore()
    token = tokens.issue(SECRET, CALL, 300)
    await tokens.redeem(store, SECRET, token, CALL)
    with pytest.raises(tokens.TokenRefused, match="used already"):
        await tokens.redeem(store, SECRET, token, CALL)


# -- the mark ledger --------------------------------------------------------------------------

async def test_the_ledger_counts_what_was_played_from_echoed_marks() -> None:
    stopped: list[str] = []
    ledger = MarkLedger(stopped.append, ahead_ms=1000)
    marks = [ledger.sent("resp_1", "item_1", 100) for _ in range(5)]
    assert marks[-1] == "resp_1:item_1:500" and ledger.queued_ms() == 500
    assert ledger.played_ms("item_1") == 0 and ledger.played_ms("item_x") is None
    for name in marks[:3]:
        ledger.echoed(name)
    assert ledger.played_ms("item_1") == 300 and ledger.queued_ms() == 200
    drained = asyncio.create_task(ledger.drained("resp_1"))
    await asyncio.sleep(0)
    assert not drained.done()
    for name in marks[3:]:
        ledger.echoed(name)
    await asyncio.wait_for(drained, 1)
    ledger.stop("resp_1")
    assert stopped == []  # nothing was playing: no clear


async def test_sending_waits_while_a_second_is_queued_at_the_far_end() -> None:
    ledger = MarkLedger(lambda _: None, ahead_ms=1000)
    marks = [ledger.sent("resp_1", "item_1", 500) for _ in range(3)]
    waiting = asyncio.create_task(ledger.room("resp_1"))
    await asyncio.sleep(0)
    assert not waiting.done()
    ledger.echoed(marks[0])
    assert await asyncio.wait_for(waiting, 1) is True


async def test_a_stop_clears_freezes_what_was_played_and_releases_waiters() -> None:
    stopped: list[str] = []
    ledger = MarkLedger(stopped.append, ahead_ms=100)
    marks = [ledger.sent("resp_1", "item_1", 100) for _ in range(4)]
    ledger.echoed(marks[0])
    waiting = asyncio.create_task(ledger.room("resp_1"))
    drained = asyncio.create_task(ledger.drained("resp_1"))
    await asyncio.sleep(0)
    ledger.stop("resp_1")
    assert stopped == ["resp_1"]
    assert await asyncio.wait_for(waiting, 1) is False  # its audio is not to be sent
    await asyncio.wait_for(drained, 1)
    for name in marks[1:]:  # Twilio echoes the marks the clear dropped
        ledger.echoed(name)
    assert ledger.played_ms("item_1") == 100
    ledger.echoed("not-ours")  # ignored


# -- the webhook --------------------------------------------------------------------------------

def webhook_app(**settings: Any) -> Starlette:
    app = Starlette(routes=[Route("/twilio/voice", twilio_voice, methods=["POST"])],
                    exception_handlers={ParleyError: _error})
    app.state.runtime = SimpleNamespace(settings=Settings(**settings))
    return app


async def _error(request: Any, exc: Exception) -> Any:
    from starlette.responses import JSONResponse

    assert isinstance(exc, ParleyError)
    return JSONResponse(exc.to_dict(), status_code=exc.status)


FORM = {"AccountSid": "AC" + "a" * 32, "CallSid": CALL, "From": "+15550001111",
        "To": "+15550002222", "CallStatus": "ringing"}


async def post(app: Starlette, url: str, form: dict[str, str], signature: str | None
               ) -> httpx.Response:
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        return await client.post(url, data=form, headers=headers)


async def test_the_webhook_is_not_there_without_an_auth_token() -> None:
    response = await post(webhook_app(), "http://test/twilio/voice", FORM, "x")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_a_signed_webhook_gets_twiml_that_connects_the_stream() -> None:
    app = webhook_app(twilio_auth_token=SECRET)
    url = "http://test/twilio/voice"
    signature = RequestValidator(SECRET).compute_signature(url, FORM)
    response = await post(app, url, FORM, signature)
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/xml")
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "ws://test/twilio/media"
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert parameters["from"] == "+15550001111" and parameters["to"] == "+15550002222"
    tokens.check(SECRET, parameters["token"], CALL)  # bound to this call


@pytest.mark.parametrize("signature", [None, "", "bm90IGEgc2lnbmF0dXJl"])
async def test_an_unsigned_or_wrongly_signed_webhook_is_forbidden(signature: str | None
                                                                    ) -> None:
    response = await post(webhook_app(twilio_auth_token=SECRET), "http://test/twilio/voice",
                          FORM, signature)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "invalid_signature"


async def test_a_changed_parameter_breaks_the_signature() -> None:
    url = "http://test/twilio/voice"
    signature = RequestValidator(SECRET).compute_signature(url, FORM)
    response = await post(webhook_app(twilio_auth_token=SECRET), url,
                          {**FORM, "From": "+15559999999"}, signature)
    assert response.status_code == 403


async def test_behind_a_proxy_the_public_url_is_what_was_signed() -> None:
    app = webhook_app(twilio_auth_token=SECRET, public_url="https://voice.example.com")
    signature = RequestValidator(SECRET).compute_signature(
        "https://voice.example.com/twilio/voice", FORM)
    response = await post(app, "http://10.0.0.5:8000/twilio/voice", FORM, signature)
    assert response.status_code == 200
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://voice.example.com/twilio/media"


def test_the_stream_url_follows_the_webhook_scheme() -> None:
    assert media_url("https://a.example/twilio/voice?x=1") == "wss://a.example/twilio/media"
    assert media_url("http://127.0.0.1:8000/twilio/voice") == "ws://127.0.0.1:8000/twilio/media"


# -- settings and messages ----------------------------------------------------------------------

def test_a_number_of_its_own_overrides_the_twilio_settings() -> None:
    settings = Settings(twilio_greeting="Hi.", twilio_numbers={
        "+15550002222": {"greeting": "Bookings, hello.", "voice": "alba"}})
    own = call_settings(settings, "+15550002222")
    assert own["greeting"] == "Bookings, hello." and own["voice"] == "alba"
    assert own["instructions"] == settings.twilio_instructions
    assert call_settings(settings, "+15550003333")["greeting"] == "Hi."


def test_the_number_table_loads_from_the_toml_file(tmp_path) -> None:
    from agent.config import load_settings

    path = tmp_path / "parley.toml"
    path.write_text('[twilio]\ngreeting = "Hello."\n'
                    '[twilio.numbers."+15550002222"]\ninstructions = "Take bookings."\n')
    settings = load_settings(path, environ={})
    assert settings.twilio_greeting == "Hello."
    assert settings.twilio_numbers == {"+15550002222": {"instructions": "Take bookings."}}


@pytest.mark.parametrize(("message", "ok"), [
    ({"event": "connected", "protocol": "Call", "version": "1.0.0"}, True),
    ({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": "/////w=="}}, True),
    ({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": "%%"}}, False),
    ({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "5",
      "dtmf": {"track": "inbound_track", "digit": "7"}}, True),
    ({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "77"}}, False),
    ({"event": "teleport"}, False),
    ([], False),
])
def test_twilio_messages_are_checked_against_the_schema(message: Any, ok: bool) -> None:
    assert (inbound_problem(message) is None) is ok


def test_tokens_are_short_lived_by_default() -> None:
    assert Settings().twilio_token_ttl_s <= 600
    assert tokens.check(SECRET, tokens.issue(SECRET, CALL, 1), CALL, now=time.time())


class RecordingSession:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.turns = SimpleNamespace(response=None)

    async def handle(self, raw: str) -> None:
        import json

        self.events.append(json.loads(raw))


async def test_keypad_digits_are_grouped_into_one_user_message_and_answered() -> None:
    from agent.phone.media import PhoneCall

    runtime: Any = SimpleNamespace(settings=Settings(twilio_dtmf_timeout_ms=50))
    call = PhoneCall(cast_any(None), runtime, "MZ1", CALL, {})
    session: Any = RecordingSession()
    for digit in "12":
        call._digit(session, digit)
    await asyncio.sleep(0)
    assert session.events == []  # the group is still open
    call._digit(session, "#")    # ends it at once
    assert call._digit_timer is not None
    await asyncio.wait_for(call._digit_timer, 1)
    created, respond = session.events
    assert created["item"]["content"][0]["text"] == "DTMF: 12"
    assert respond["type"] == "response.create"
    call._digit(session, "7")    # the timeout ends a group too
    await asyncio.wait_for(call._digit_timer, 1)
    assert session.events[-2]["item"]["content"][0]["text"] == "DTMF: 7"


def cast_any(value: Any) -> Any:
    return value
