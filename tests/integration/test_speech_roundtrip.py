"""TTS → codec → ASR: what Parley says can be heard back, in every format and speed.

Real Piper speech is encoded to an output format, decoded as a client's upload would be,
and transcribed by Whisper base. Word error rate is measured on normalized text (lower
case, no punctuation, small numbers spelled out). Two bounds:

- every clip: WER ≤ MAX_WER. Whisper base mishears a few short function words in clean
  synthetic speech ("with a light" → "with the light", "her dog" → "or dog"), at most 3 of
  these 31 words in trials here, so 0.15 (4 words) leaves one word of slack;
- a codec must not cost more than two extra words over the lossless WAV of the same
  speech, which isolates codec or resampler damage from the recogniser's own mistakes.
  (Not one: those borderline words flip under any small change; in one run of about ten,
  the 64 kbps MP3 of a clip lost exactly those two words that its WAV kept.)

Every format is checked at speed 1.0, and the other speeds with three formats each (each
clip costs a Whisper run, and the suite must stay quick).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from agent.audio import decode_audio, encode_audio
from agent.config import Settings
from agent.speech.tts import TTSEngine
from tests.speech_text import word_error_rate

pytestmark = pytest.mark.slow

TEXT = (
    "Please book a table near the window for dinner tonight. "
    "The weather today is sunny and warm, with a light breeze. "
    "My sister likes to walk her dog in the park."
)
FORMATS = ("wav", "mp3", "opus", "flac", "aac", "pcm16", "g711_ulaw")
SPEEDS = (0.75, 1.0, 1.5)
RANGE = (0.25, 0.5, 2.0, 3.0, 4.0)
# Narrowband G.711 (8 kHz) is not paired with fast speech: Whisper base's error rate on
# that pair varied from 0.10 to 0.23 between Piper's (random) renditions here, a limit of
# the recogniser on telephone-band audio rather than anything Parley does.
CASES = [(fmt, 1.0) for fmt in FORMATS] + [
    *((fmt, 0.75) for fmt in ("wav", "mp3", "g711_ulaw")),
    *((fmt, 1.5) for fmt in ("wav", "mp3", "opus")),
]
MAX_WER = 0.15
ASR_RATE = 16000
RAW_INPUT = {"pcm16": ("pcm16", 24000), "g711_ulaw": ("g711_ulaw", 8000)}
# AAC adds up to two 1024-sample frames of priming and padding (93 ms at 22,050 Hz).
MAX_LENGTH_CHANGE_S = 0.15


@pytest.fixture(scope="module")
def speech(settings: Settings) -> dict[float, tuple[np.ndarray, int]]:
    # One fixed rendition (no random prosody), so a codec is judged on the same speech
    # every run, not on whether this run's rendition happens to be hard for Whisper.
    engine = TTSEngine(dataclasses.replace(settings, tts_threads=1, tts_variation=False))
    try:
        return {speed: engine.synthesize(TEXT, "alloy", speed) for speed in (*SPEEDS, *RANGE)}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def asr(settings: Settings):
    from agent.speech.asr import ASREngine

    engine = ASREngine(settings)
    yield engine
    engine.close()


def transcribe(asr, pcm: np.ndarray) -> str:
    return asr.transcribe(pcm, words=False).text


def heard_back(speech, asr, fmt: str, speed: float) -> str:
    pcm, rate = speech[speed]
    data = encode_audio(pcm, rate, fmt)
    raw_format, raw_rate = RAW_INPUT.get(fmt, (None, None))
    heard = decode_audio(data, raw_format, rate=ASR_RATE, input_rate=raw_rate)
    # About as long as what was said: the codec neither cut nor padded the speech.
    assert abs(len(heard) / ASR_RATE - len(pcm) / rate) < MAX_LENGTH_CHANGE_S
    return transcribe(asr, heard)


@pytest.fixture(scope="module")
def hear(speech, asr):
    """(format, speed) → transcript, each clip transcribed once per module."""
    return functools.cache(lambda fmt, speed: heard_back(speech, asr, fmt, speed))


@pytest.fixture(scope="module")
def lossless_wer(hear) -> dict[float, float]:
    return {speed: word_error_rate(TEXT, hear("wav", speed)) for speed in SPEEDS}


@pytest.mark.parametrize(("fmt", "speed"), CASES)
def test_spoken_words_come_back(hear, lossless_wer, fmt: str, speed: float):
    text = hear(fmt, speed)
    wer = word_error_rate(TEXT, text)
    assert wer <= MAX_WER, f"{fmt} at speed {speed}: WER {wer:.2f}: {text!r}"
    two_words = 2 / len(TEXT.split())
    assert wer <= lossless_wer[speed] + two_words + 1e-9, (
        f"{fmt} at speed {speed}: WER {wer:.2f} vs {lossless_wer[speed]:.2f} for wav: {text!r}"
    )


# What Whisper base still hears of the whole range (wav, this fixed rendition). At 2x it
# measured WER 0.16 (one word more than at speed 1). 3x and 4x are faster than anyone
# talks (10 to 16 syllables a second) and Whisper base follows neither (WER 0.81 and 0.90
# here), so there only the length is held; that is a limit the issue notes, not a pass.
HEARD_SPEEDS = {0.25: MAX_WER, 0.5: MAX_WER, 2.0: 0.2}


@pytest.mark.parametrize("speed", RANGE)
def test_the_whole_speed_range_lasts_one_over_speed(speech, hear, speed: float):
    at_one = len(speech[1.0][0])
    ratio = len(speech[speed][0]) / (at_one / speed)
    assert 0.9 < ratio < 1.1, f"speed {speed}: {ratio:.3f} of 1/speed as long"
    if speed in HEARD_SPEEDS:
        text = hear("wav", speed)
        wer = word_error_rate(TEXT, text)
        assert wer <= HEARD_SPEEDS[speed], f"speed {speed}: WER {wer:.2f}: {text!r}"
