"""Silero VAD turn detection on real speech (Piper joe) with silences of known length.

Boundaries are checked against the voiced extent of each sentence, measured from the TTS
output's energy. The model scores 32 ms frames and ends speech only when a frame falls
below threshold - 0.15, so an onset may be reported up to two frames late or one early,
and the end of speech up to TRAILING_TOLERANCE after the last loud sample (word endings
fade out below the energy gate while the model still hears them).
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.audio.vad import (
    FRAME,
    RATE,
    SileroVad,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    VadOptions,
    VadStream,
    speech_segments,
)
from agent.config import Settings
from agent.errors import AudioError, InvalidRequestError
from tests.speech_fixtures import SENTENCES, Speech, Synthesiser, noise, silence, synthesiser

ONSET_EARLY = FRAME
ONSET_LATE = 2 * FRAME
TRAILING_TOLERANCE = round(0.2 * RATE)
FLOOR = 1e-3  # microphone-like background noise under the whole signal


@pytest.fixture(scope="module")
def vad(settings: Settings) -> SileroVad:
    return SileroVad.from_settings(settings)


@pytest.fixture(scope="module")
def synth() -> Synthesiser:
    return synthesiser()


def with_noise(audio: np.ndarray, seed: int = 0) -> np.ndarray:
    return audio + noise(len(audio) / RATE, FLOOR, seed)[: len(audio)]


def layout(*parts: np.ndarray | Speech) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate silences and sentences; return the signal and each sentence's voiced span."""
    pieces, spans, offset = [], [], 0
    for part in parts:
        audio = part.audio if isinstance(part, Speech) else part
        if isinstance(part, Speech):
            spans.append((offset + part.voiced_start, offset + part.voiced_end))
        pieces.append(audio)
        offset += len(audio)
    return with_noise(np.concatenate(pieces)), spans


def feed_in_chunks(stream: VadStream, audio: np.ndarray, size: int) -> list:
    events = []
    for start in range(0, len(audio), size):
        events.extend(stream.feed(audio[start:start + size]))
    return events


def turns(events: list) -> list:
    return [e for e in events if not isinstance(e, SpeechPaused)]


@pytest.fixture(scope="module")
def two_sentences(synth) -> tuple[np.ndarray, list[tuple[int, int]]]:
    return layout(silence(1.0), synth.speech(SENTENCES[0]), silence(1.2),
                  synth.speech(SENTENCES[1]), silence(1.0))


def test_turn_boundaries_match_the_speech(vad, two_sentences):
    audio, spans = two_sentences
    options = VadOptions(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    events = turns(VadStream(vad, options).feed(audio))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped] * 2
    prefix, silence_samples = 300 * RATE // 1000, 500 * RATE // 1000
    previous_end = 0
    pairs = zip(events[::2], events[1::2], strict=True)
    for (start, stop), (voiced_start, voiced_end) in zip(pairs, spans, strict=True):
        assert voiced_start - ONSET_EARLY <= start.onset <= voiced_start + ONSET_LATE
        # audio_start includes the prefix padding, as OpenAI's speech_started does.
        assert start.sample == max(start.onset - prefix, previous_end)
        assert voiced_end - FRAME <= stop.speech_end <= voiced_end + TRAILING_TOLERANCE
        # audio_end includes the silence that ended the turn.
        assert stop.sample == stop.speech_end + silence_samples
        assert stop.audio_end_ms == stop.sample * 1000 // RATE
        previous_end = stop.sample


def test_chunk_size_does_not_change_the_events(vad, two_sentences):
    audio, _ = two_sentences
    expected = VadStream(vad).feed(audio)
    for size in (160, 512, 777, 4000):
        assert feed_in_chunks(VadStream(vad), audio, size) == expected, size


def test_int16_input_gives_the_same_events(vad, two_sentences):
    audio, _ = two_sentences
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)
    assert VadStream(vad).feed(pcm) == VadStream(vad).feed(pcm.astype(np.float32) / 32768)


def test_interleaved_streams_keep_their_own_state(vad, synth, two_sentences):
    first, _ = two_sentences
    second, _ = layout(silence(0.4), synth.speech(SENTENCES[2]), silence(0.9))
    alone = [VadStream(vad).feed(first), VadStream(vad).feed(second)]
    streams = [VadStream(vad), VadStream(vad)]
    got: list[list] = [[], []]
    size = 1000
    for start in range(0, max(len(first), len(second)), size):
        for i, audio in enumerate((first, second)):
            if start < len(audio):
                got[i].extend(streams[i].feed(audio[start:start + size]))
    assert got == alone
    assert turns(alone[1])  # the second stream did hear speech


def test_a_pause_shorter_than_silence_duration_keeps_one_turn(vad, synth):
    audio, spans = layout(silence(0.5), synth.speech(SENTENCES[3]).trimmed(), silence(0.3),
                          synth.speech(SENTENCES[4]).trimmed(), silence(1.0))
    assert spans[1][0] - spans[0][1] == round(0.3 * RATE)
    one_turn = turns(VadStream(vad, VadOptions(silence_duration_ms=500)).feed(audio))
    assert [type(e) for e in one_turn] == [SpeechStarted, SpeechStopped]
    assert one_turn[1].speech_end >= spans[1][1] - FRAME
    two_turns = turns(VadStream(vad, VadOptions(silence_duration_ms=150)).feed(audio))
    assert [type(e) for e in two_turns] == [SpeechStarted, SpeechStopped] * 2


def test_the_pause_is_reported_before_the_turn_ends(vad, synth):
    audio, _ = layout(silence(0.5), synth.speech(SENTENCES[3]), silence(1.0))
    stream = VadStream(vad)
    events = stream.feed(audio)
    paused = [e for e in events if isinstance(e, SpeechPaused)]
    stopped = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(stopped) == 1 and paused[-1].speech_end == stopped[0].speech_end
    assert events.index(paused[-1]) < events.index(stopped[0])


@pytest.mark.parametrize("seconds", [3.0])
def test_silence_and_noise_are_not_speech(vad, seconds):
    quiet = with_noise(silence(seconds))
    hiss = noise(seconds, 0.05, seed=3)
    hum = (0.1 * np.sin(2 * np.pi * 50 * np.arange(round(seconds * RATE)) / RATE)).astype(
        np.float32)
    for audio in (silence(seconds), quiet, hiss, hum):
        stream = VadStream(vad)
        assert stream.feed(audio) == []
        assert not stream.speaking


def test_min_speech_ms_rejects_short_blips(vad, synth):
    speech = synth.speech(SENTENCES[0])
    mid = (speech.voiced_start + speech.voiced_end) // 2
    blip = speech.audio[mid: mid + round(0.12 * RATE)]
    audio = with_noise(np.concatenate([silence(1.0), blip, silence(1.0)]))
    assert turns(VadStream(vad, VadOptions(min_speech_ms=32)).feed(audio))
    assert turns(VadStream(vad, VadOptions(min_speech_ms=300)).feed(audio)) == []


def test_prefix_padding_never_reaches_before_the_audio(vad, synth):
    audio, _ = layout(silence(0.05), synth.speech(SENTENCES[5]), silence(0.8))
    first = VadStream(vad, VadOptions(prefix_padding_ms=300)).feed(audio)[0]
    assert isinstance(first, SpeechStarted) and first.sample == 0 < first.onset


def test_frame_probabilities_are_exposed(vad, two_sentences):
    audio, spans = two_sentences
    stream = VadStream(vad)
    stream.feed(audio)
    history = dict(stream.history)
    assert len(history) == len(audio) // FRAME
    assert all(0.0 <= p <= 1.0 for p in history.values())
    assert np.allclose(list(history.values()), vad.probabilities(audio), atol=1e-6)
    (voiced_start, voiced_end), margin = spans[0], RATE // 4
    inside = [p for s, p in history.items() if voiced_start + margin <= s < voiced_end - margin]
    outside = [p for s, p in history.items() if s + FRAME < voiced_start - RATE // 10]
    assert np.mean(inside) > 0.8 and max(outside) < 0.2


def test_reset_forgets_everything(vad, two_sentences):
    audio, _ = two_sentences
    stream = VadStream(vad)
    expected = stream.feed(audio)
    stream.feed(audio[: len(audio) // 3])
    stream.reset()
    assert stream.position == 0 and not stream.speaking
    assert stream.feed(audio) == expected


def test_speech_segments_of_a_clip(vad, two_sentences):
    audio, spans = two_sentences
    segments = speech_segments(vad, audio)
    assert len(segments) == 2
    for (start, end), (voiced_start, voiced_end) in zip(segments, spans, strict=True):
        assert start < voiced_start < voiced_end < end


async def test_feed_async_runs_off_the_loop(vad, two_sentences):
    audio, _ = two_sentences
    assert await VadStream(vad).feed_async(audio) == VadStream(vad).feed(audio)


def test_bad_input_is_a_typed_error(vad):
    stream = VadStream(vad)
    with pytest.raises(AudioError):
        stream.feed(np.zeros((2, 512), dtype=np.float32))
    with pytest.raises(AudioError):
        stream.feed(np.zeros(512, dtype=np.int32))
    with pytest.raises(InvalidRequestError):
        VadOptions(threshold=1.5)
    VadOptions(threshold=0.0), VadOptions(threshold=1.0)  # OpenAI's range is inclusive
    with pytest.raises(InvalidRequestError):
        VadOptions(silence_duration_ms=-1)
