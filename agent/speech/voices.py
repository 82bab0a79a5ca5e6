"""Piper voices: which file each voice name speaks with, loaded once and shared.

OpenAI's voice names (alloy, ash, …) map to Piper voices through `Settings.voice_map()`;
a value is a bundled voice ("joe") or the path of any Piper `.onnx` voice with its
`.onnx.json` beside it. Names that map to the same file share one loaded model.

Speed. Piper changes speaking rate through `length_scale`, which scales each phoneme's
predicted length before the model rounds it up to whole frames. That rounding gives every
phoneme (and the blanks between them) at least one frame, so a voice's duration behaves
like `fixed + variable * length_scale` rather than `variable * length_scale`: plain
`length_scale = 1/speed` gives only 1.6× at speed 2 and 3.3× slower at 0.25. Each voice is
measured once (two deterministic syntheses, at its first speed other than 1) and the length
scale is solved so that speech lasts about 1/speed as long. The fit is only close: a clause
at speed 2 came out 3 to 17% long, and near 2.2× the one-frame floor is reached (speed 4
came out hardly shorter than speed 2). So at any speed other than 1 each clause is also
synthesised at speed 1, without duration noise, to learn how long it really is, and a
pitch-keeping time-stretch (`agent.audio.stretch`) takes Piper's clause, spoken at
min(speed, MAX_MODEL_SPEED), onto exactly 1/speed of that. Piper does as much of the
change as it can because its own fast speech stays more intelligible than stretched
speech (Whisper base, 4 sentences at speed 3: 17% WER from Piper at 2× then stretched,
44% from speed-1 speech stretched 3×).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent import assets
from agent.config import Settings
from agent.errors import ConfigError, VoiceError

# Solved length scales below this gain almost nothing (the frame floor) and slur words.
MIN_LENGTH_SCALE = 0.2
# The fastest rate asked of Piper itself; faster speech is stretched from this one.
MAX_MODEL_SPEED = 2.0
_CALIBRATION_TEXT = "A quick test of the speaking rate, with a few ordinary words."


@dataclass(frozen=True)
class SpeedPlan:
    """How one speaking rate is made: Piper at `length_scale`, then (speed ≠ 1) a stretch
    onto exactly 1/speed of the clause's duration at speed 1."""

    length_scale: float
    speed: float = 1.0


@dataclass
class LoadedVoice:
    """A Piper voice ready to synthesise, with what its speed mapping needs."""

    name: str
    path: Path
    piper: object            # piper.PiperVoice (imported lazily: piper pulls onnxruntime)
    rate: int
    _fixed_fraction: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def fixed_fraction(self) -> float:
        """Share of a clause's duration that does not scale with length_scale (see module
        doc). Measured on first need, so speaking at speed 1 never waits for it."""
        with self._lock:
            if self._fixed_fraction is None:
                self._fixed_fraction = _measure_fixed_fraction(self.piper)
            return self._fixed_fraction

    def speed_plan(self, speed: float) -> SpeedPlan:
        """What makes speech last 1/speed as long as at speed 1."""
        return SpeedPlan(self.length_scale(min(speed, MAX_MODEL_SPEED)), speed)

    def length_scale(self, speed: float) -> float:
        """The length scale that makes Piper's speech last 1/speed as long as at speed 1."""
        base = float(getattr(self.piper.config, "length_scale", 1.0) or 1.0)  # type: ignore[attr-defined]
        if speed == 1.0:
            return base
        f = self.fixed_fraction
        return base * max(MIN_LENGTH_SCALE, (1.0 / speed - f) / (1.0 - f))


def _is_bundled(target: str) -> bool:
    spec = assets.MODELS.get(target)
    return spec is not None and spec.role == "tts"


def _check_target(name: str, target: str) -> None:
    """A configured voice must be a bundled voice or an existing .onnx with its .json."""
    if _is_bundled(target):
        return
    path = Path(target).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        raise ConfigError(
            f"voice {name!r} maps to {target!r}, which is neither a bundled voice "
            f"({', '.join(n for n in assets.MODELS if _is_bundled(n))}) nor a Piper .onnx file"
        )
    if not Path(f"{path}.json").is_file():
        raise ConfigError(f"voice {name!r}: {path} has no {path.name}.json beside it")


class VoiceBank:
    """Voice names → loaded Piper voices. Thread-safe; each file loads at most once."""

    def __init__(self, settings: Settings):
        self._map = settings.voice_map()
        for name, target in self._map.items():
            _check_target(name, target)
        self._cache_dir = settings.cache_dir
        self._threads = max(1, settings.tts_threads)
        self._loaded: dict[Path, LoadedVoice] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._map)

    def check(self, name: str) -> str:
        """Return the name if it is a known voice; raise VoiceError listing valid ones."""
        if not isinstance(name, str) or name not in self._map:
            raise VoiceError(
                f"unknown voice {name!r}; valid voices: {', '.join(self._map)}", param="voice"
            )
        return name

    def get(self, name: str) -> LoadedVoice:
        """The loaded voice for a name, loading (and measuring) it on first use."""
        target = self._map[self.check(name)]
        path = self._model_path(target)
        with self._lock:
            voice = self._loaded.get(path)
            if voice is None:
                voice = self._load(name, path)
                self._loaded[path] = voice
        return voice

    def _model_path(self, target: str) -> Path:
        if _is_bundled(target):
            return assets.resolve(target, self._cache_dir)
        return Path(target).expanduser()

    def _load(self, name: str, path: Path) -> LoadedVoice:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        try:
            config = PiperConfig.from_dict(json.loads(Path(f"{path}.json").read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"voice {name!r}: cannot read {path}.json: {exc}") from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=execution_providers()
        )
        piper = PiperVoice(session=session, config=config)
        return LoadedVoice(name, path, piper, config.sample_rate)


def execution_providers() -> list[str]:
    """Where Piper's ONNX graph runs: on CUDA when this onnxruntime build has its CUDA
    provider (onnxruntime-gpu), falling back to the CPU for any node CUDA lacks; on the
    CPU otherwise."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _measure_fixed_fraction(piper) -> float:
    """Fit duration = fixed + variable·length_scale from two syntheses (also a warm-up)."""
    from piper import SynthesisConfig

    base = float(piper.config.length_scale or 1.0)

    def samples(length_scale: float) -> float:
        # No duration noise, so the two runs differ only by length_scale.
        config = SynthesisConfig(length_scale=length_scale, noise_w_scale=0.0)
        chunks = piper.synthesize(_CALIBRATION_TEXT, config)
        return float(np.sum([len(c.audio_float_array) for c in chunks]))

    at_one, at_two = samples(base), samples(2.0 * base)
    variable = at_two - at_one
    if at_one <= 0 or variable <= 0:
        return 0.0
    return float(np.clip((at_one - variable) / at_one, 0.0, 0.6))
