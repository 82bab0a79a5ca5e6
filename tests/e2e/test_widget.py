"""The browser widget in Debian's Chromium against a real `parley serve`.

Chromium's fake capture device plays a WAV of ours as the microphone; the widget's own
events, what crossed its WebSocket and what its shadow DOM shows are read back from the
page (agent.bench.widget drives it, as `parley bench widget` does).
"""

from __future__ import annotations

import re

import httpx
import pytest

from agent.bench.widget import (
    LEAD_S,
    STORY,
    TALK_OVER,
    TALK_OVER_AFTER_S,
    Segment,
    chromium,
    talk,
    write_capture,
)
from agent.config import load_settings
from tests.server_process import free_port

pytestmark = pytest.mark.slow

BARGE_IN_LIMIT_MS = 300
QUESTION = "What time do your stores open on Saturday?"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("capture")
    settings = load_settings(tts_variation=False)
    story = folder / "story.wav"
    write_capture([Segment(None, LEAD_S), Segment(STORY), Segment(None, TALK_OVER_AFTER_S),
                   Segment(TALK_OVER), Segment(None, 7.0)], story, settings)
    question = folder / "question.wav"
    write_capture([Segment(None, LEAD_S), Segment(QUESTION), Segment(None, 7.0)], question,
                  settings)
    return {"story": story, "question": question}


async def test_talk_and_interrupt(server, captures):
    """Start, ask for a story, talk over it: the question's transcript and the answer's
    appear, the answer plays, speech over it silences it within 300 ms, and the server is
    told how much was heard."""
    async with chromium(captures["story"]) as browser:
        record = await talk(browser, server + "/widget/", seconds=25)

    states = record.states()
    assert states[:2] == ["connecting", "listening"], states
    for state in ("user-speaking", "thinking", "speaking"):
        assert state in states, states
    assert record.stats["codec"] == "opus"   # Chromium has WebCodecs' Opus encoder
    assert record.subprotocol == "realtime"
    assert record.sent_of("session.update")[0]["session"]["audio"]["input"]["format"] == \
        {"type": "audio/opus"}

    users = record.finals("user")
    assert len(users) >= 2, users
    assert {"story", "dragon"} & _words(users[0]), users
    assert {"capital", "france"} & _words(users[1]), users

    # The story was cut short: playback fell silent quickly and the item was truncated to
    # what the worklet had played, which the server confirmed.
    barge = record.timings("barge-in")
    assert barge and 0 <= barge[0] <= BARGE_IN_LIMIT_MS, barge
    truncate = record.sent_of("conversation.item.truncate")
    assert len(truncate) == 1, truncate
    story_item = truncate[0]["item_id"]
    heard = truncate[0]["audio_end_ms"]
    assert 0 < heard == record.stats["playedMs"][story_item]
    confirmed = record.received_of("conversation.item.truncated")
    assert [(e["item_id"], e["audio_end_ms"]) for e in confirmed] == [(story_item, heard)]
    cancelled = [e for e in record.received_of("response.done")
                 if e["response"]["status"] == "cancelled"]
    assert cancelled, "the story's response was not cancelled by the talk-over"

    # The next question got its own answer, played.
    played = {item: ms for item, ms in record.stats["playedMs"].items() if item != story_item}
    assert played and max(played.values()) > 500, record.stats
    assert len(record.timings("voice-to-voice")) >= 2

    # What the visitor sees: both sides in the widget's log, the story as it was heard.
    roles = [line["role"] for line in record.transcript]
    assert roles.count("user") >= 2 and roles.count("assistant") >= 2, record.transcript
    story_line = next(line for line in record.transcript if line["role"] == "assistant")
    generated = [e["detail"]["text"] for e in record.events
                 if e["name"] == "parley-assistant-transcript"
                 and e["detail"]["itemId"] == story_item]
    assert story_line["text"] and len(story_line["text"]) < len(max(generated, key=len))
    assert record.error_line == ""
    assert not [line for line in record.console if "page error" in line], record.console


async def test_stop_while_speaking(server, captures):
    """Stop pressed during the answer: playback ends, the server is told what was heard,
    the widget is idle again."""
    async with chromium(captures["story"]) as browser:
        record = await talk(browser, server + "/widget/", seconds=25, stop_in="speaking")
    assert record.states()[-2:] == ["speaking", "idle"], record.states()
    truncate = record.sent_of("conversation.item.truncate")
    assert len(truncate) == 1, record.sent
    item = truncate[0]["item_id"]
    assert 0 < truncate[0]["audio_end_ms"] == record.stats["playedMs"][item]
    assert record.error_line == ""


async def test_pcm16_where_webcodecs_is_missing(server, captures):
    """A browser without WebCodecs gets PCM16 chosen for it, and the conversation works."""
    async with chromium(captures["question"]) as browser:
        record = await talk(browser, server + "/widget/", seconds=14,
                            before="delete window.AudioEncoder; delete window.AudioData;")
    assert record.stats["codec"] == "pcm16"
    fmt = record.sent_of("session.update")[0]["session"]["audio"]["input"]["format"]
    assert fmt == {"type": "audio/pcm", "rate": 24000}
    # 20 ms chunks of 24 kHz PCM16
    assert record.stats["bytesSent"] == record.stats["chunksSent"] * 960
    users = record.finals("user")
    assert users and _words(users[0]) == _words(QUESTION), users
    answers = record.finals("assistant")
    assert answers and answers[0].strip(), answers
    assert max(record.stats["playedMs"].values()) > 500
    assert record.states()[-1] == "listening"


async def test_refused_microphone(server):
    """Started from the keyboard with the microphone refused: the error state and a line
    that says what to do; no session is opened."""
    async with chromium(None, allow_microphone=False) as browser:
        record = await talk(browser, server + "/widget/", seconds=10, until="parley-error",
                            start_with_keyboard=True)
    assert record.states() == ["connecting", "error"]
    assert "Microphone access was refused" in record.error_line
    errors = [e["detail"]["message"] for e in record.events if e["name"] == "parley-error"]
    assert errors == [record.error_line]
    assert not record.sent


async def test_unreachable_server(server, captures):
    async with chromium(captures["question"]) as browser:
        record = await talk(browser, server + "/widget/", seconds=10, until="parley-error",
                            attributes={"server": f"http://127.0.0.1:{free_port()}"})
    assert record.states()[-1] == "error"
    assert "Cannot reach the Parley server at http://127.0.0.1:" in record.error_line


def test_widget_routes(server):
    script = httpx.get(server + "/widget/parley-voice.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["access-control-allow-origin"] == "*"
    assert "customElements.define(\"parley-voice\"" in script.text

    assert httpx.get(server + "/widget").headers["location"] == "/widget/"
    page = httpx.get(server + "/widget/")
    assert '<parley-voice client-secret-url="/widget/client-secret">' in page.text

    secret = httpx.post(server + "/widget/client-secret", json={"session": {
        "type": "realtime", "instructions": "Be brief."}})
    assert secret.status_code == 200
    body = secret.json()
    assert body["value"].startswith("ek_") and body["session"]["instructions"] == "Be brief."

    bad = httpx.post(server + "/widget/client-secret", json={"session": {"type": "nope"}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    # Behind a proxy a loopback peer proves nothing: no secrets without a key.
    proxied = httpx.post(server + "/widget/client-secret", json={},
                         headers={"x-forwarded-for": "203.0.113.9"})
    assert proxied.status_code == 404
    assert proxied.json()["error"]["code"] == "not_found"
    assert "widget_demo" in proxied.json()["error"]["message"]
