"""Whisper on a window cut to the audio instead of the fixed 30 s.

faster-whisper always encodes 3,000 mel frames (30 s), so a 2 s clip costs as much as a
30 s one. CTranslate2's Whisper also accepts shorter feature windows, but Whisper was
trained on full windows only: on a window that ends right after the speech, base
repeats itself ("Hello. Hello. Hello.") or mishears short words ("Sure." → "Chair.").
The rule here was found on Piper sentences (86 clips, 0.6 to 15 s, three speaking rates),
comparing with faster-whisper's full window after case and punctuation normalisation:
  - pad the log-mel features exactly as faster-whisper does (zeros after the audio;
    padding the waveform with silence instead did worse),
  - keep at least TAIL_FRAMES (3 s) of padding after the audio, and
  - encode at least MIN_FRAMES (10 s).
That matched on 85 of 86 clips; the other repeated its last words, which `Guard` catches.
Minimum windows of 5 or 8 s, or tails of 0.5 s, each missed several clips, some in ways no
guard can see (a wrong word). The encoder's cost grows with the window, so a 2 s clip
costs about a third of the full window.

The window can still go wrong on audio unlike the test set. `Guard` recognises the
failure modes seen (repetition, text placed after the audio ended, hitting the token
limit, low confidence); the caller then falls back to the full window.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ctranslate2
import numpy as np

from agent.speech.transcript import Segment, Transcript, Word

if TYPE_CHECKING:  # faster_whisper loads CTranslate2's models: imported where it runs
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

RATE = 16_000
HOP = 160                     # samples per mel frame (10 ms)
FULL_FRAMES = 3000            # Whisper's 30 s window
MIN_FRAMES = 1000
TAIL_FRAMES = 300
TIME_PRECISION = 0.02         # seconds per timestamp token
MAX_PROMPT_TOKENS = 223       # Whisper's limit for previous-text conditioning
# Punctuation faster-whisper attaches to the neighbouring word when timing words.
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
# faster-whisper's own thresholds for a failed decode (it retries at higher temperature).
MAX_COMPRESSION_RATIO = 2.4
MIN_AVG_LOGPROB = -1.0
NO_SPEECH_PROB = 0.6


def window_frames(content_frames: int) -> int | None:
    """Frames to encode for `content_frames` of audio; None when only 30 s windows fit."""
    frames = max(content_frames + TAIL_FRAMES, MIN_FRAMES)
    return frames if frames <= FULL_FRAMES else None


def max_new_tokens(seconds: float) -> int:
    """A generous bound on tokens for speech this long (fast speech is ~5 tokens/s), so a
    decode that starts repeating stops early instead of running to 448 tokens."""
    return min(int(24 + 12 * seconds), 440)


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]
    segments: list[tuple[float, float, list[int]]]  # (start, end, text tokens)
    avg_logprob: float
    no_speech_prob: float
    hit_limit: bool


def split_segments(tokens: list[int], timestamp_begin: int, eot: int, duration: float
                   ) -> list[tuple[float, float, list[int]]]:
    """Timestamp-delimited segments: `<t0> text <t1><t1> text <t2>`; an unclosed last
    segment ends with the audio."""
    segments: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            time = (token - timestamp_begin) * TIME_PRECISION
            if start is None:
                start = time
            else:
                if text:
                    segments.append((start, min(time, duration), text))
                start, text = None, []
        elif token < eot:
            text.append(token)
    if text:
        segments.append((start or 0.0, duration, text))
    return segments


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def ends_with_repeat(words: list[str]) -> bool:
    """True when the last k words repeat the k before them ("yes please yes please").

    This is how a short window's loop starts on short clips. Real speech does it too
    ("bye bye"); those clips only pay for the full window, which decides.
    """
    return any(words[-2 * k:-k] == words[-k:] for k in range(1, len(words) // 2 + 1))


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class Guard:
    """Why a short-window decode should not be trusted, or None when it looks sound."""

    @staticmethod
    def check(decoded: Decoded, texts: list[str], duration: float) -> str | None:
        if decoded.hit_limit:
            return "hit the token limit"
        if any(start >= duration - 0.1 for start, _, _ in decoded.segments):
            return "text placed after the end of the audio"
        joined = " ".join(texts)
        if compression_ratio(joined) > MAX_COMPRESSION_RATIO:
            return "repetitive text"
        normalised = [_normalised(t) for t in texts]
        if any(a and a == b for a, b in itertools.pairwise(normalised)):
            return "a segment repeats the previous one"
        if ends_with_repeat(_normalised(joined).split()):
            return "the text ends by repeating itself"
        if decoded.avg_logprob < MIN_AVG_LOGPROB:
            return "low confidence"
        return None


class ShortWindow:
    """Transcribes clips of up to ~27 s on a window cut to the audio (see module doc).

    `model` is a faster_whisper.WhisperModel; its feature extractor, tokenizer and word
    aligner are reused so the output matches its own transcripts.
    """

    def __init__(self, model: WhisperModel) -> None:
        self.model = model

    def features(self, audio: np.ndarray) -> tuple[np.ndarray, int] | None:
        """(1, n_mels, window) features and the number of frames that hold audio."""
        mel = self.model.feature_extractor(audio)[:, :-1]  # drops the stft's extra frame
        content = mel.shape[1]
        frames = window_frames(content)
        if frames is None:
            return None
        padded = np.zeros((1, mel.shape[0], frames), dtype=np.float32)
        padded[0, :, :content] = mel
        return padded, content

    def encode(self, features: np.ndarray) -> ctranslate2.StorageView:
        return self.model.model.encode(ctranslate2.StorageView.from_array(features))

    def detect_language(self, encoded: ctranslate2.StorageView) -> tuple[str, float]:
        if not self.model.model.is_multilingual:
            return "en", 1.0
        token, probability = self.model.model.detect_language(encoded)[0][0]
        return token[2:-2], float(probability)

    def decode(self, encoded: ctranslate2.StorageView, tokenizer: Tokenizer, duration: float,
               initial_prompt: str | None = None) -> Decoded:
        prompt = list(tokenizer.sot_sequence)
        if initial_prompt and initial_prompt.strip():
            # Previous-text conditioning, as Whisper does: <|startofprev|> text, then the
            # usual start sequence; at most half the decoder's context goes to it.
            previous = tokenizer.encode(" " + initial_prompt.strip())[-(MAX_PROMPT_TOKENS):]
            prompt = [tokenizer.sot_prev, *previous, *prompt]
        limit = max_new_tokens(duration)
        result = self.model.model.generate(
            encoded, [prompt], beam_size=1, max_length=len(prompt) + limit,
            return_scores=True, return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=[-1],
        )[0]
        tokens = list(result.sequences_ids[0])
        # CTranslate2 scores the sum of log-probs over the tokens plus end of text.
        avg_logprob = float(result.scores[0]) * len(tokens) / (len(tokens) + 1)
        return Decoded(
            tokens=tokens,
            segments=split_segments(tokens, tokenizer.timestamp_begin, tokenizer.eot, duration),
            avg_logprob=avg_logprob,
            no_speech_prob=float(result.no_speech_prob),
            hit_limit=len(tokens) >= limit,
        )

    def words(self, decoded: Decoded, tokenizer: Tokenizer, encoded: ctranslate2.StorageView,
              content_frames: int) -> list[Word]:
        """Word timings from cross-attention, exactly as faster-whisper computes them."""
        window: list[dict[str, Any]] = [
            {"seek": 0, "start": start, "end": end, "tokens": text}
            for start, end, text in decoded.segments
        ]
        if not window:
            return []
        self.model.add_word_timestamps(
            [window], tokenizer, encoded, content_frames,
            PREPEND_PUNCTUATION, APPEND_PUNCTUATION, last_speech_timestamp=0.0,
        )
        return [
            Word(w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
            for segment in window for w in segment.get("words", [])
        ]

    def transcribe(self, audio: np.ndarray, language: str | None, words: bool,
                   prompt: str | None = None) -> Transcript | str:
        """The transcript, or the reason (a string) to use the full window instead."""
        from faster_whisper.tokenizer import Tokenizer

        duration = len(audio) / RATE
        prepared = self.features(audio)
        if prepared is None:
            return "longer than a short window"
        features, content = prepared
        encoded = self.encode(features)
        probability = 1.0
        if language is None:
            language, probability = self.detect_language(encoded)
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                              task="transcribe", language=language)
        decoded = self.decode(encoded, tokenizer, duration, prompt)
        if decoded.no_speech_prob > NO_SPEECH_PROB and decoded.avg_logprob < MIN_AVG_LOGPROB:
            return Transcript.empty(language, duration)
        texts = [tokenizer.decode(text).strip() for _, _, text in decoded.segments]
        problem = Guard.check(decoded, texts, duration)
        if problem:
            return problem
        timed = self.words(decoded, tokenizer, encoded, content) if words else []
        return Transcript(
            text=" ".join(t for t in texts if t),
            language=language,
            duration=duration,
            segments=tuple(Segment(s, e, t) for (s, e, _), t in zip(decoded.segments, texts,
                                                                      strict=True)),
            words=tuple(timed),
            language_probability=probability,
            window="short",
        )
