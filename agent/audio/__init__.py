"""Audio: decode and encode every wire format, resampling, G.711, Opus packets.

Submodules: `formats` (names, MIME types, rates), `decode`, `encode`, `g711`, `opus`,
`resample`, `pcm` (sample conversions), `containers` (recognising and checking files).
`agent.audio.vad` (Silero) is imported on its own; nothing here loads a model.
"""

from agent.audio import g711
from agent.audio.decode import RawStreamDecoder, decode_audio
from agent.audio.encode import StreamingEncoder, encode_audio
from agent.audio.formats import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    RAW_FORMATS,
    STREAMING_OUTPUT_FORMATS,
    input_format,
    mime_type,
    output_format,
    output_rate,
)
from agent.audio.opus import OpusPacketDecoder
from agent.audio.resample import StreamingResampler, resample

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "RAW_FORMATS",
    "STREAMING_OUTPUT_FORMATS",
    "OpusPacketDecoder",
    "RawStreamDecoder",
    "StreamingEncoder",
    "StreamingResampler",
    "decode_audio",
    "encode_audio",
    "g711",
    "input_format",
    "mime_type",
    "output_format",
    "output_rate",
    "resample",
]
