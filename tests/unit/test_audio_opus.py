"""Raw Opus packets, as a WebSocket client sends them, decoded one at a time.

Packets come from PyAV's libopus encoder (64 kbit/s). Bounds: the decoded stream matches
the source at >= 15 dB SNR after aligning for libopus's 312-sample (6.5 ms) lookahead
(measured 16.2-27.6 dB on this speech-like signal: 60 ms frames lowest, 16 kHz output
highest; libopus is deterministic, so these do not vary between runs).
"""

from __future__ import annotations

import av
import numpy as np
import pytest
from audio_signals import align, snr_db, speech_like

from agent.audio import OpusPacketDecoder, resample
from agent.errors import AudioError

SOURCE = speech_like(48000, 1.0)


def opus_packets(signal: np.ndarray, frame_ms: int = 20, layout: str = "mono") -> list[bytes]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48000
    encoder.layout = layout
    encoder.format = "flt"
    encoder.bit_rate = 64000
    encoder.options = {"frame_duration": str(frame_ms)}
    encoder.open()
    channels = 1 if layout == "mono" else 2
    frame_size = 48 * frame_ms
    packets = []
    for start in range(0, len(signal), frame_size):
        block = np.zeros(frame_size * channels, dtype=np.float32)
        chunk = np.repeat(signal[start:start + frame_size], channels)
        block[:len(chunk)] = chunk
        frame = av.AudioFrame.from_ndarray(block[None, :], format="flt", layout=layout)
        frame.sample_rate = 48000
        frame.pts = start
        packets += [bytes(p) for p in encoder.encode(frame)]
    packets += [bytes(p) for p in encoder.encode(None)]
    return packets


def decode_all(decoder: OpusPacketDecoder, packets: list[bytes]) -> list[np.ndarray]:
    return [decoder.decode(packet) for packet in packets] + [decoder.flush()]


@pytest.mark.parametrize("frame_ms", [10, 20, 60])
def test_packets_decode_one_at_a_time_to_the_source(frame_ms):
    packets = opus_packets(SOURCE, frame_ms)
    pieces = decode_all(OpusPacketDecoder(rate=48000), packets)
    # Each packet yields its whole frame at once: nothing waits for the next packet.
    assert all(len(piece) == 48 * frame_ms for piece in pieces[:-1])
    out = np.concatenate(pieces)
    assert out.dtype == np.float32
    ref, test = align(SOURCE, out, max_lag=1000)
    assert len(ref) >= len(SOURCE) - 48 * frame_ms
    assert snr_db(ref, test) > 15.0


def test_output_at_16k_for_asr():
    out = np.concatenate(decode_all(OpusPacketDecoder(rate=16000), opus_packets(SOURCE)))
    expected = resample(SOURCE, 48000, 16000)
    assert abs(len(out) - len(expected)) <= 2 * 320 + 110     # 2 frames + lookahead
    ref, test = align(expected, out, max_lag=400)
    assert snr_db(ref, test) > 15.0


def test_stereo_packets_come_out_mono():
    out = np.concatenate(decode_all(OpusPacketDecoder(rate=48000),
                                    opus_packets(SOURCE, layout="stereo")))
    ref, test = align(SOURCE, out, max_lag=1000)
    assert snr_db(ref, test) > 15.0


# A lone code-3 TOC (no frame count), a frame count of zero, a 1999-byte frame (the
# limit is 1275), a packet larger than any Opus packet, and 0xFF's impossible frame count.
@pytest.mark.parametrize("bad", [b"\x03", b"\x03\x00", bytes(2000), b"\x0b" * 9000, b"\xff"])
def test_bad_packets_raise_and_the_stream_continues(bad):
    packets = opus_packets(SOURCE)
    decoder = OpusPacketDecoder(rate=48000)
    decoder.decode(packets[0])
    with pytest.raises(AudioError):
        decoder.decode(bad)
    assert len(decoder.decode(packets[1])) == 960


def test_empty_packet_is_rejected_without_ending_the_stream():
    packets = opus_packets(SOURCE)
    decoder = OpusPacketDecoder(rate=48000)
    with pytest.raises(AudioError):
        decoder.decode(b"")
    assert len(decoder.decode(packets[0])) > 0


def test_reset_starts_a_fresh_stream():
    packets = opus_packets(SOURCE)[:10]
    decoder = OpusPacketDecoder(rate=16000)
    first = np.concatenate(decode_all(decoder, packets))
    decoder.reset()
    again = np.concatenate(decode_all(decoder, packets))
    np.testing.assert_array_equal(first, again)
