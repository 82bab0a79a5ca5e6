"""`parley transcribe` and `parley say`: the speech engines from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.config import Settings
from agent.errors import AudioError, InvalidRequestError, ParleyError

ASR_RATE = 16000


def transcribe_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print the transcript of an audio file; with --words, one timed word per line."""
    from agent.audio import decode_audio

    path: Path = args.file
    data = _read(path)
    pcm = decode_audio(
        data,
        _raw_format(path),
        rate=ASR_RATE,
        max_seconds=settings.max_audio_seconds,
        max_bytes=settings.max_audio_bytes,
    )
    from agent.speech.asr import ASREngine  # after the checks: it loads the model

    engine = ASREngine(settings)
    try:
        transcript = engine.transcribe(pcm, language=args.language, words=args.words)
    finally:
        engine.close()
    print(transcript.text.strip())
    if args.words:
        for word in transcript.words:
            print(f"{word.start:8.2f} {word.end:8.2f}  {word.word.strip()}")
    return 0


def say_command(settings: Settings, args: argparse.Namespace) -> int:
    """Synthesise text (or stdin, for "-") and write it in the chosen format."""
    from agent.audio import encode_audio, output_format
    from agent.speech.clauses import count_words
    from agent.speech.tts import TTSEngine

    text = sys.stdin.read() if args.text == "-" else args.text
    if count_words(text) == 0:
        raise InvalidRequestError("there is nothing to say: the text has no words", param="text")
    fmt = output_format(_output_format_name(args.format, args.output)).name
    engine = TTSEngine(settings)
    try:
        pcm, rate = engine.synthesize(text, args.voice, args.speed)
    finally:
        engine.close()
    data = encode_audio(pcm, rate, fmt)
    try:
        args.output.write_bytes(data)
    except OSError as exc:
        raise ParleyError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    print(f"wrote {args.output}: {fmt}, {len(pcm) / rate:.2f} s, {len(data):,} bytes",
          file=sys.stderr)
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _raw_format(path: Path) -> str | None:
    """Headerless files (.pcm, .ulaw, .alaw …) must be named; containers are recognised."""
    from agent.audio.formats import input_format, is_raw

    suffix = path.suffix.lstrip(".")
    try:
        return input_format(suffix) if suffix and is_raw(suffix) else None
    except AudioError:
        return None


def _output_format_name(requested: str | None, output: Path) -> str:
    """--format if given; otherwise the output's extension decides (`-o hi.mp3` writes an
    MP3), and wav when the extension names no format."""
    from agent.audio import output_format

    if requested is not None:
        return requested
    suffix = output.suffix.lstrip(".")
    if suffix:
        try:
            return output_format(suffix).name
        except AudioError:
            pass
    return "wav"
