"""`parley bench phone`'s table: voice to voice over every turn of every call, talk-over →
clear once per call, the targets marked, failed calls counted."""

from __future__ import annotations

import numpy as np

from agent.bench.phone import CallResult, as_mulaw, render
from agent.bench.realtime import Question
from agent.bench.twilio_phone import FRAME, RATE
from agent.config import Settings


def test_the_table_has_medians_and_percentiles_and_marks_the_targets() -> None:
    rows = [(1, [CallResult(clear_ms=450, voice_to_voice_ms=[700, 900, 760])]),
            (4, [CallResult(clear_ms=700, voice_to_voice_ms=[1200]),
                 CallResult(failures=["TimeoutError: no audio"])])]
    table = render(rows, Settings(), quick=True, load=0.3).splitlines()
    one = next(line for line in table if line.startswith("| 1 |"))
    four = next(line for line in table if line.startswith("| 4 |"))
    assert one.startswith("| 1 | 3 | 760 ms ✓ |") and "450 ms ✓" in one and one.endswith(
        "| 0 |")
    assert four.startswith("| 4 | 1 | 1200 ms |") and "700 ms ✗" in four
    assert four.endswith("| 1 |")


def test_a_question_becomes_whole_mulaw_frames_and_knows_where_its_voice_begins() -> None:
    rate = 24_000
    voice = (np.sin(np.arange(rate // 2) / 5) * 0.5 * 32767).astype("<i2")
    pcm = np.concatenate([np.zeros(rate // 10, "<i2"), voice]).tobytes()
    spoken = as_mulaw(Question("hi", pcm))
    assert len(spoken.audio) % FRAME == 0
    assert abs(spoken.onset_s - 0.1) < 0.03
    assert len(spoken.audio) / RATE >= 0.6
