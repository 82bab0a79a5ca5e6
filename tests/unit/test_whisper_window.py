"""The short window's rules, on token sequences (the model runs in tests/integration)."""

from __future__ import annotations

from agent.speech.whisper_window import (
    FULL_FRAMES,
    MIN_FRAMES,
    TAIL_FRAMES,
    Decoded,
    Guard,
    ends_with_repeat,
    max_new_tokens,
    split_segments,
    window_frames,
)

TS = 50364   # Whisper's first timestamp token (<|0.00|>); each step is 20 ms
EOT = 50257


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_window_keeps_a_tail_and_a_minimum_and_gives_up_past_30_s():
    assert window_frames(100) == MIN_FRAMES
    assert window_frames(900) == 900 + TAIL_FRAMES
    assert window_frames(FULL_FRAMES - TAIL_FRAMES) == FULL_FRAMES
    assert window_frames(FULL_FRAMES - TAIL_FRAMES + 1) is None


def test_token_budget_grows_with_the_audio_but_stays_under_whispers_limit():
    assert max_new_tokens(1.0) < max_new_tokens(10.0) <= 440
    assert max_new_tokens(60.0) == 440


def test_segments_are_split_on_timestamp_pairs():
    tokens = [ts(0.0), 1, 2, ts(1.5), ts(1.5), 3, ts(2.4), EOT]
    assert split_segments(tokens, TS, EOT, 3.0) == [(0.0, 1.5, [1, 2]), (1.5, 2.4, [3])]


def test_an_unclosed_segment_ends_with_the_audio_and_empty_ones_vanish():
    tokens = [ts(0.0), ts(0.5), ts(0.5), 7, 8]
    assert split_segments(tokens, TS, EOT, 2.0) == [(0.5, 2.0, [7, 8])]


def test_closing_timestamps_past_the_audio_are_clamped():
    assert split_segments([ts(0.0), 4, ts(9.0)], TS, EOT, 2.5) == [(0.0, 2.5, [4])]


def test_repeated_endings_are_recognised():
    assert ends_with_repeat(["yes", "please", "yes", "please"])
    assert ends_with_repeat(["hello", "hello"])
    assert not ends_with_repeat(["yes", "please"])
    assert not ends_with_repeat(["the", "cat", "sat", "on", "the", "mat"])
    assert not ends_with_repeat([])


def decoded(segments, *, avg_logprob=-0.2, hit_limit=False) -> Decoded:
    return Decoded(tokens=[], segments=segments, avg_logprob=avg_logprob,
                   no_speech_prob=0.01, hit_limit=hit_limit)


def test_guard_accepts_a_plain_sentence():
    ok = decoded([(0.0, 2.0, [1])])
    assert Guard.check(ok, ["Turn off the lights in the kitchen."], 2.2) is None


def test_guard_rejects_each_failure_seen_on_short_windows():
    text = ["Turn off the lights."]
    assert Guard.check(decoded([(0.0, 2.0, [1])], hit_limit=True), text, 2.2)
    assert Guard.check(decoded([(0.0, 1.0, [1]), (2.2, 3.0, [2])]), text * 2, 2.2)
    assert Guard.check(decoded([(0.0, 1.0, [1]), (1.0, 2.0, [2])]), text * 2, 2.2)
    assert Guard.check(decoded([(0.0, 2.0, [1])]), ["Yes, please yes, please"], 2.2)
    assert Guard.check(decoded([(0.0, 2.0, [1])]), ["Stop " * 30], 2.2)
    assert Guard.check(decoded([(0.0, 2.0, [1])], avg_logprob=-1.5), text, 2.2)
