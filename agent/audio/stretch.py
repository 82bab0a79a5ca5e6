"""Time-stretch that keeps pitch: FFmpeg's `atempo` filter through PyAV.

Used for speaking rates the TTS model cannot reach by itself (see `agent.speech.voices`).
`atempo` is a WSOLA stretch: it keeps pitch and formants, and its output length is the
input length over the tempo to within a few milliseconds. Each call is independent, so a
reply streamed clause by clause is stretched clause by clause; the first and last few
milliseconds are faded so that two stretched clauses never meet on a step (a click).
"""

from __future__ import annotations

import av
import numpy as np
from av.filter import Graph

# atempo accepts 0.5 to 100 per instance; one instance covers every rate we need.
MIN_TEMPO = 0.5
MAX_TEMPO = 100.0
FADE_S = 0.004


def _fade_edges(pcm: np.ndarray, rate: int) -> np.ndarray:
    n = min(int(rate * FADE_S), len(pcm) // 2)
    if n > 0:
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n, dtype=np.float32)))
        pcm[:n] *= ramp
        pcm[-n:] *= ramp[::-1]
    return pcm


def stretch(pcm: np.ndarray, rate: int, tempo: float) -> np.ndarray:
    """float32 mono `pcm` played `tempo` times as fast, pitch unchanged."""
    if not MIN_TEMPO <= tempo <= MAX_TEMPO:
        raise ValueError(f"tempo {tempo} is outside atempo's {MIN_TEMPO}–{MAX_TEMPO}")
    samples = np.ascontiguousarray(pcm, dtype=np.float32)
    if tempo == 1.0 or len(samples) == 0:
        return samples
    graph = Graph()
    source = graph.add_abuffer(sample_rate=rate, format="flt", layout="mono")
    tempo_filter = graph.add("atempo", f"{tempo:.6f}")
    sink = graph.add("abuffersink")
    source.link_to(tempo_filter)
    tempo_filter.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    graph.push(frame)
    graph.push(None)  # end of stream: atempo flushes what it holds
    pieces = []
    while True:
        try:
            pieces.append(graph.pull().to_ndarray()[0])
        except (av.BlockingIOError, av.EOFError):
            break
    out = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return _fade_edges(out, rate)
