"""Prometheus metrics: where the time of every realtime turn goes, for `GET /metrics`.

One registry per process (not prometheus_client's global one, so that tests and several
apps in one process do not collide on names). The realtime session reports each response
when it ends; the same numbers go to a client that asked for `parley.turn.latency`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

# Voice latency lives between ~0.1 s and tens of seconds on a busy CPU.
_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0)

VOICE_TO_VOICE = Histogram(
    "parley_realtime_voice_to_voice_seconds",
    "End of the user's speech to the first assistant audio byte sent, per turn.",
    ["speculative"], buckets=_BUCKETS, registry=REGISTRY)
STAGE = Histogram(
    "parley_realtime_stage_seconds",
    "Time of each stage of a realtime turn (speech_end_to_response, "
    "response_to_first_token, response_to_first_audio).",
    ["stage"], buckets=_BUCKETS, registry=REGISTRY)
RESPONSES = Counter(
    "parley_realtime_responses_total", "Realtime responses by final status.", ["status"],
    registry=REGISTRY)
SPECULATIONS = Counter(
    "parley_realtime_speculations_total",
    "Replies started in the end-of-turn silence: used (the turn ended there) or dropped.",
    ["outcome"], registry=REGISTRY)
SESSIONS = Gauge("parley_realtime_sessions", "Realtime sessions open now.",
                 registry=REGISTRY)


def turn_finished(status: str, stages_ms: dict[str, int | None],
                  voice_to_voice_ms: int | None, speculative: bool) -> None:
    RESPONSES.labels(status).inc()
    for stage, ms in stages_ms.items():
        if ms is not None:
            STAGE.labels(stage).observe(ms / 1000)
    if voice_to_voice_ms is not None:
        VOICE_TO_VOICE.labels(str(speculative).lower()).observe(voice_to_voice_ms / 1000)


def speculation(outcome: str) -> None:
    SPECULATIONS.labels(outcome).inc()
