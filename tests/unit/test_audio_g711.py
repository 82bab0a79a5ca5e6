"""G.711 against the standard: Python 3.11's audioop is an independent ITU G.711 codec."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from agent.audio import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # deprecated since 3.11, removed in 3.13: a test-only reference

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = bytes(range(256))


def test_ulaw_encode_matches_standard_for_every_int16():
    expected = audioop.lin2ulaw(ALL_SAMPLES.astype("<i2").tobytes(), 2)
    assert g711.ulaw_encode(ALL_SAMPLES) == expected


def test_alaw_encode_matches_standard_for_every_int16():
    expected = audioop.lin2alaw(ALL_SAMPLES.astype("<i2").tobytes(), 2)
    assert g711.alaw_encode(ALL_SAMPLES) == expected


def test_ulaw_decode_matches_standard_for_every_code():
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(g711.ulaw_decode(ALL_CODES), expected)


def test_alaw_decode_matches_standard_for_every_code():
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), dtype="<i2")
    np.testing.assert_array_equal(g711.alaw_decode(ALL_CODES), expected)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_input_kinds_agree(law):
    encode = getattr(g711, f"{law}_encode")
    samples = ALL_SAMPLES[::7]
    as_bytes = samples.astype("<i2").tobytes()
    as_float = samples.astype(np.float32) / 32768.0
    assert encode(samples) == encode(as_bytes) == encode(as_float)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_decoding_then_encoding_every_code_is_stable(law):
    encode, decode = getattr(g711, f"{law}_encode"), getattr(g711, f"{law}_decode")
    decoded = decode(ALL_CODES)
    # µ-law has two zero codes (0x7F, 0xFF); both decode to 0 and re-encode to 0xFF.
    assert encode(decode(encode(decoded))) == encode(decoded)
    np.testing.assert_array_equal(decode(encode(decoded)), decoded)


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_float_output_and_companding_error(law):
    encode, decode = getattr(g711, f"{law}_encode"), getattr(g711, f"{law}_decode")
    t = np.arange(8000) / 8000
    signal = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    decoded = decode(encode(signal), dtype=np.float32)
    assert decoded.dtype == np.float32
    snr = 10 * np.log10(np.sum(signal**2) / np.sum((signal - decoded) ** 2))
    assert snr > 33.0   # G.711 gives ~38 dB on a loud tone


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        g711.ulaw_encode(b"\x00\x01\x02")           # half a sample
    with pytest.raises(TypeError):
        g711.alaw_decode(np.zeros(4, dtype=np.int16))
