"""Resampling: right length, right pitch, no aliasing, and chunked equals whole."""

from __future__ import annotations

import numpy as np
import pytest
from audio_signals import peak_frequency, speech_like, tone

from agent.audio import StreamingResampler, resample


@pytest.mark.parametrize(("src", "dst"), [(48000, 16000), (24000, 16000), (8000, 16000),
                                          (22050, 24000), (44100, 8000)])
def test_length_and_pitch_are_preserved(src, dst):
    out = resample(tone(src, 1.0, 440.0), src, dst)
    assert out.dtype == np.float32
    assert len(out) == dst
    assert abs(peak_frequency(out, dst) - 440.0) < 2.0


def test_downsampling_filters_out_what_the_new_rate_cannot_hold():
    # 7 kHz cannot exist at 8 kHz; naive decimation would fold it to 1 kHz.
    out = resample(tone(48000, 1.0, 7000.0), 48000, 8000)
    assert np.sqrt(np.mean(out[200:-200] ** 2)) < 0.005      # input RMS is 0.35


@pytest.mark.parametrize("chunk", [1, 160, 441, 4096])
def test_streaming_equals_whole_buffer(chunk):
    signal = speech_like(24000, 0.5)
    stream = StreamingResampler(24000, 16000)
    pieces = [stream.process(signal[i:i + chunk]) for i in range(0, len(signal), chunk)]
    pieces.append(stream.flush())
    np.testing.assert_allclose(np.concatenate(pieces), resample(signal, 24000, 16000),
                               atol=1e-6)


def test_streaming_resampler_is_reusable_after_flush_and_passes_equal_rates_through():
    stream = StreamingResampler(16000, 8000)
    first = np.concatenate([stream.process(tone(16000, 0.1)), stream.flush()])
    second = np.concatenate([stream.process(tone(16000, 0.1)), stream.flush()])
    np.testing.assert_allclose(first, second, atol=1e-6)
    same = StreamingResampler(16000, 16000)
    assert same.passthrough
    np.testing.assert_array_equal(same.process(tone(16000, 0.1)), tone(16000, 0.1))


def test_int16_input_and_clipping():
    loud = np.full(1600, 32767, dtype=np.int16)
    out = resample(loud, 16000, 44100)
    assert out.max() <= 1.0 and out.min() >= -1.0


@pytest.mark.parametrize("rate", [0, -16000, 10, 10_000_000, 16000.5])
def test_bad_rates_are_rejected(rate):
    with pytest.raises(ValueError):
        resample(np.zeros(10, np.float32), rate, 16000)
