"""The pure parts of `parley bench realtime`: percentiles, the voiced span of a question,
chunk alignment, and the README table (no server, no models)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.bench.realtime import (
    CHUNK,
    RATE,
    Level,
    Turn,
    align_to_chunks,
    percentile,
    render,
    voiced_span,
)


def test_percentile_interpolates_between_ranks():
    values = [400.0, 100.0, 300.0, 200.0]
    assert percentile(values, 0) == 100.0
    assert percentile(values, 100) == 400.0
    assert percentile(values, 50) == pytest.approx(250.0)
    assert percentile(values, 95) == pytest.approx(385.0)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)),
                                                  rel=1e-9, abs=1e-6)


def test_percentile_refuses_out_of_range():
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def _tone(seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_voiced_span_drops_the_silence_around_speech():
    speech = _tone(1.0)
    noise = np.random.default_rng(0).normal(0, 1e-4, int(0.3 * RATE)).astype(np.float32)
    clip = np.concatenate([noise, speech, noise])
    start, end = voiced_span(clip, RATE)
    frame = RATE // 100
    assert abs(start - len(noise)) <= frame
    assert abs(end - (len(noise) + len(speech))) <= frame


def test_voiced_span_of_silence_is_empty():
    assert voiced_span(np.zeros(RATE, np.float32), RATE) == (0, 0)
    assert voiced_span(np.zeros(3, np.float32), RATE) == (0, 0)


def test_align_to_chunks_pads_in_front_so_speech_ends_a_chunk():
    speech = _tone(1.234)
    aligned = align_to_chunks(speech, CHUNK)
    assert len(aligned) % CHUNK == 0
    assert len(aligned) - len(speech) < CHUNK
    np.testing.assert_array_equal(aligned[-len(speech):], speech)
    assert not aligned[: len(aligned) - len(speech)].any()
    assert len(align_to_chunks(aligned, CHUNK)) == len(aligned)


def _turn(v2v_ms: float | None, *, session: int = 0, stages: dict[str, int] | None = None
          ) -> Turn:
    turn = Turn(session, "Where is my order?", voiced_end=10.0, speech_stopped=10.6,
                transcribed=10.8, response_id="resp_1", status="completed",
                prompt_tokens=90, cached_tokens=70, server_stages=stages or {})
    if v2v_ms is not None:
        turn.first_clause = 10.0 + v2v_ms / 1000 - 0.3
        turn.first_audio = 10.0 + v2v_ms / 1000
    return turn


def test_render_reports_percentiles_stages_and_failures():
    stages = {"speech_end_to_response": 900, "response_to_first_token": 200,
              "response_to_first_audio": 700}
    alone = Level(1, True, [_turn(ms, stages=stages) for ms in (700.0, 750.0, 800.0)])
    alone.turns[0].speculative = True
    crowded = Level(4, False, [*(_turn(ms, session=i % 4, stages=stages)
                          for i, ms in enumerate((1000.0, 1400.0, 2000.0, 3000.0))),
                        _turn(None)])
    table = render([alone, crowded], "Measured somewhere.")
    lines = table.splitlines()
    assert lines[0] == "Measured somewhere."
    header = next(line for line in lines if line.startswith("| sessions"))
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 4 ")]
    assert len(rows) == 2
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in rows[0].strip("|").split("|")], strict=True))
    assert cells["turns"] == "3"
    assert cells["replies held in the silence"] == "on (1 of 3 used)"
    assert cells["voice-to-voice p50"] == "750 ms ✓"   # 1 session: the p50 target applies
    assert cells["end-of-turn wait"] == "600 ms"
    assert cells["transcription"] == "200 ms"
    assert cells["response → first token"] == "200 ms"
    assert cells["first clause → first audio"] == "300 ms"
    assert cells["prompt tokens (cached)"] == "90 (70)"
    assert cells["failed"] == "0"
    crowded_cells = dict(zip(cells, [c.strip() for c in rows[1].strip("|").split("|")],
                             strict=True))
    assert crowded_cells["turns"] == "5"
    assert crowded_cells["replies held in the silence"] == "off"
    assert crowded_cells["failed"] == "1"
    assert crowded_cells["p95"].endswith("✗")            # 4 sessions: the p95 target applies
    assert "✓" not in crowded_cells["voice-to-voice p50"]  # and not the p50 one


def test_render_shows_a_dash_for_a_stage_the_server_did_not_report():
    table = render([Level(1, True, [_turn(800.0)])], "h")
    row = next(line for line in table.splitlines() if line.startswith("| 1 "))
    assert "—" in row
