"""Real speech for the VAD and ASR tests: Piper's joe voice, resampled to 16 kHz.

Test modules import these helpers (`from tests.speech_fixtures import ...`). The voice
loads once per session (`synthesiser()`); each sentence is synthesised once and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import soxr
from piper import SynthesisConfig

from agent import assets
from agent.config import load_settings

RATE = 16_000

# Known sentences with plain words, so a transcript can be compared word for word.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please book a table for two at seven tonight.",
    "My flight to Boston leaves on Monday morning.",
    "Turn off the lights in the kitchen.",
    "What is the weather like tomorrow?",
    "I would like to pay my electricity bill.",
)
SHORT = "Yes, please."


@dataclass(frozen=True)
class Speech:
    """One synthesised sentence and where its voiced part lies (samples at 16 kHz)."""

    text: str
    audio: np.ndarray  # float32, mono, 16 kHz
    voiced_start: int
    voiced_end: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE

    def trimmed(self) -> Speech:
        """Only the voiced part: Piper leaves ~0.1 s of near-silence at each edge."""
        audio = self.audio[self.voiced_start:self.voiced_end]
        return Speech(self.text, audio, 0, len(audio))


def voiced_extent(audio: np.ndarray, rate: int = RATE) -> tuple[int, int]:
    """First and last sample of the region whose 10 ms energy is within 40 dB of the peak."""
    hop = rate // 100
    frames = len(audio) // hop
    energy = np.square(audio[: frames * hop].reshape(frames, hop)).mean(axis=1)
    loud = np.flatnonzero(energy > energy.max() * 1e-4)
    return int(loud[0] * hop), int((loud[-1] + 1) * hop)


class Synthesiser:
    """Piper joe, deterministic (no generator noise), returning 16 kHz float32."""

    def __init__(self) -> None:
        from piper import PiperVoice

        path = assets.resolve("joe", load_settings().cache_dir)
        self._voice = PiperVoice.load(str(path))
        self._rate = self._voice.config.sample_rate

    @functools.lru_cache(maxsize=128)  # noqa: B019 - one instance per session
    def speech(self, text: str, length_scale: float = 1.0) -> Speech:
        """`text` spoken by joe; length_scale > 1 speaks slower."""
        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)
        chunks = [c.audio_float_array for c in self._voice.synthesize(text, config)]
        native = np.concatenate(chunks).astype(np.float32)
        audio = soxr.resample(native, self._rate, RATE).astype(np.float32)
        start, end = voiced_extent(audio)
        return Speech(text, audio, start, end)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


def noise(seconds: float, level: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(round(seconds * RATE)) * level).astype(np.float32)


@functools.cache
def synthesiser() -> Synthesiser:
    """The one Piper voice of the test session (loads on first use)."""
    return Synthesiser()
