"""The audio format names Parley accepts and produces, with their MIME types and rates.

Input names are what clients send (OpenAI's `input_audio.format`, Realtime's
`input_audio_format`, a transcription upload's extension or Content-Type). Container
formats (wav, mp3, flac, ogg/opus, webm, aac, m4a) carry their own rate; the raw formats
(pcm16, g711_ulaw, g711_alaw) have no header, so they need an explicit name and rate.

Output names are OpenAI's (`audio.format` in Chat Completions, `response_format` in
/v1/audio/speech, Realtime's output formats) plus G.711. Every output format streams: a
`StreamingEncoder` returns bytes for each chunk as soon as the codec has a frame for it
(see `agent.audio.encode` for the latency of each).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import AudioError

# Formats carried in a container that names its own rate and channels.
CONTAINER_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "aac", "m4a")
# Headerless formats: the caller names them and their rate.
RAW_FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")
INPUT_FORMATS = CONTAINER_FORMATS + RAW_FORMATS

OUTPUT_FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16", "g711_ulaw", "g711_alaw")

# Other spellings clients use: file extensions, Realtime GA names, MIME types.
_ALIASES = {
    "wave": "wav", "x-wav": "wav",
    "mpeg": "mp3", "mpga": "mp3", "mp2": "mp3",
    "opus": "ogg", "oga": "ogg",
    "mkv": "webm", "matroska": "webm",
    "mp4": "m4a", "m4b": "m4a", "mov": "m4a", "adts": "aac",
    "pcm": "pcm16", "s16le": "pcm16", "raw": "pcm16",
    "pcmu": "g711_ulaw", "ulaw": "g711_ulaw", "mulaw": "g711_ulaw", "g711u": "g711_ulaw",
    "pcma": "g711_alaw", "alaw": "g711_alaw", "g711a": "g711_alaw",
}

_INPUT_MIME = {
    "audio/wav": "wav", "audio/wave": "wav", "audio/x-wav": "wav", "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpga": "mp3",
    "audio/flac": "flac", "audio/x-flac": "flac",
    "audio/ogg": "ogg", "audio/opus": "ogg", "application/ogg": "ogg",
    "audio/webm": "webm", "video/webm": "webm",
    "audio/aac": "aac", "audio/x-aac": "aac", "audio/aacp": "aac",
    "audio/mp4": "m4a", "audio/m4a": "m4a", "audio/x-m4a": "m4a", "video/mp4": "m4a",
    "audio/pcm": "pcm16", "audio/l16": "pcm16",
    "audio/basic": "g711_ulaw", "audio/pcmu": "g711_ulaw",
    "audio/x-alaw-basic": "g711_alaw", "audio/pcma": "g711_alaw",
}

# Sample rates of the raw formats when the caller does not name one (OpenAI's layouts).
DEFAULT_RAW_RATES = {"pcm16": 24000, "g711_ulaw": 8000, "g711_alaw": 8000}

# Rates the MPEG codecs can carry; other rates are resampled to the nearest one above.
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


@dataclass(frozen=True)
class OutputFormat:
    """How one output format is produced."""

    name: str
    mime: str
    fixed_rate: int | None = None          # the only rate the format carries, if any
    allowed_rates: tuple[int, ...] = ()    # otherwise a rate from this set (empty: any)
    muxer: str | None = None               # PyAV container format; None: written by hand
    codec: str | None = None               # PyAV encoder name
    bit_rate: int | None = None            # for the lossy codecs, mono
    streams: bool = True                   # bytes emerge before close()

    def rate_for(self, input_rate: int) -> int:
        """The rate this format is written at when the audio arrives at `input_rate`."""
        if self.fixed_rate is not None:
            return self.fixed_rate
        if not self.allowed_rates or input_rate in self.allowed_rates:
            return input_rate
        above = [r for r in self.allowed_rates if r >= input_rate]
        return above[0] if above else self.allowed_rates[-1]


_OUTPUT = {
    "wav": OutputFormat("wav", "audio/wav"),
    "mp3": OutputFormat("mp3", "audio/mpeg", allowed_rates=_MP3_RATES,
                        muxer="mp3", codec="libmp3lame", bit_rate=64000),
    "flac": OutputFormat("flac", "audio/flac", muxer="flac", codec="flac"),
    # Opus runs at 48 kHz inside; writing it there avoids a second resampler in libopus.
    "opus": OutputFormat("opus", "audio/ogg", fixed_rate=48000,
                         muxer="ogg", codec="libopus", bit_rate=48000),
    # FFmpeg's own AAC encoder needs more bits than LAME for the same fidelity: at 64
    # kbit/s it shifts third-octave levels by ~2 dB on a sweep, at 96 kbit/s by < 0.5 dB.
    "aac": OutputFormat("aac", "audio/aac", allowed_rates=_AAC_RATES,
                        muxer="adts", codec="aac", bit_rate=96000),
    "pcm16": OutputFormat("pcm16", "audio/pcm", fixed_rate=24000),
    "g711_ulaw": OutputFormat("g711_ulaw", "audio/basic", fixed_rate=8000),
    "g711_alaw": OutputFormat("g711_alaw", "audio/x-alaw-basic", fixed_rate=8000),
}

_INPUT_MIME_OUT = {
    "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
    "webm": "audio/webm", "aac": "audio/aac", "m4a": "audio/mp4", "pcm16": "audio/pcm",
    "g711_ulaw": "audio/basic", "g711_alaw": "audio/x-alaw-basic",
}


def _canonical(name: str) -> str:
    key = name.strip().lower()
    if "/" in key:
        key = key.split(";", 1)[0].strip()
        return _INPUT_MIME.get(key, key)
    key = key.lstrip(".")
    return _ALIASES.get(key, key)


def input_format(name: str) -> str:
    """The canonical input format for a name, alias, extension or MIME type.

    Raises AudioError (code `unsupported_format`) for a name Parley cannot decode.
    """
    canonical = _canonical(name)
    if canonical not in INPUT_FORMATS:
        raise AudioError(
            f"Unsupported audio format {name!r}; supported: {', '.join(INPUT_FORMATS)}.",
            code="unsupported_format",
        )
    return canonical


def output_format(name: str) -> OutputFormat:
    """The output format for a name ("pcm", "pcmu", "audio/pcma" are accepted too).

    Raises AudioError (code `unsupported_format`) for a name Parley cannot produce.
    """
    key = name.strip().lower()
    canonical = "opus" if key in {"opus", "ogg", "audio/ogg", "audio/opus"} else _canonical(key)
    if canonical not in _OUTPUT:
        raise AudioError(
            f"Unsupported output audio format {name!r}; "
            f"supported: {', '.join(OUTPUT_FORMATS)}.",
            code="unsupported_format",
        )
    return _OUTPUT[canonical]


def mime_type(name: str) -> str:
    """The Content-Type for an output format (or, failing that, an input format)."""
    try:
        return output_format(name).mime
    except AudioError:
        return _INPUT_MIME_OUT[input_format(name)]


def output_rate(name: str, input_rate: int) -> int:
    """The sample rate an output format is written at for audio arriving at `input_rate`."""
    return output_format(name).rate_for(input_rate)


def is_raw(name: str) -> bool:
    """Whether an input format is headerless (needs an explicit name and rate)."""
    return input_format(name) in RAW_FORMATS


STREAMING_OUTPUT_FORMATS = tuple(name for name in OUTPUT_FORMATS if _OUTPUT[name].streams)
