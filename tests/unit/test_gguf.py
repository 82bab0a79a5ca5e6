"""GGUF reading: metadata, every quant type the bundled files use, the Q/K permutation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from agent.decoder.gguf_loader import load_gguf, permute_qk, read_header, unpermute_qk
from agent.errors import ConfigError
from tests.decoder_fixtures import gguf_path

QUANTISABLE = (QT.Q4_1, QT.Q8_0, QT.Q5_0, QT.F16, QT.F32)


def _k_quant_rows(qtype: QT) -> np.ndarray | None:
    """Two rows of real K-quant bytes from the Qwen file (numpy cannot quantise K types)."""
    try:
        path = gguf_path("qwen2.5-coder-0.5b")
    except pytest.skip.Exception:
        return None
    _, infos = read_header(path)

    info = next(i for i in infos if i.qtype == qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    row_bytes = info.shape[-1] // block * size
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return np.array(data[info.offset:info.offset + 2 * row_bytes]).reshape(2, row_bytes)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict[str, QT]]:
    """A small GGUF with one tensor per quant type and metadata of every value kind."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_string("test.text", "héllo <|im_end|>")
    writer.add_float32("test.float", 0.25)
    writer.add_bool("test.flag", True)
    writer.add_array("test.strings", ["a", "b c", "Ġ t"])
    writer.add_array("test.ints", [3, 1, 4, 1, 5])
    expected: dict[str, np.ndarray] = {}
    types: dict[str, QT] = {}
    for qtype in QUANTISABLE:
        x = rng.standard_normal((3, 256)).astype(np.float32)
        name = f"t.{qtype.name.lower()}"
        if qtype == QT.F32:
            writer.add_tensor(name, x)
            expected[name] = x
        else:
            q = quantize(x, qtype)
            writer.add_tensor(name, q, raw_dtype=qtype)
            expected[name] = dequantize(q, qtype)
        types[name] = qtype
    for qtype in (QT.Q4_K, QT.Q6_K):
        rows = _k_quant_rows(qtype)
        if rows is not None:
            name = f"t.{qtype.name.lower()}"
            writer.add_tensor(name, rows, raw_dtype=qtype)
            expected[name] = dequantize(rows, qtype)
            types[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected, types


def test_metadata_of_every_value_kind(synthetic):
    path, _, _ = synthetic
    meta, _ = read_header(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 1
    assert meta["test.text"] == "héllo <|im_end|>"
    assert meta["test.float"] == 0.25
    assert meta["test.flag"] is True
    assert meta["test.strings"] == ["a", "b c", "Ġ t"]
    assert meta["test.ints"] == [3, 1, 4, 1, 5]


def test_every_quant_type_dequantises_to_the_reference(synthetic):
    path, expected, types = synthetic
    ckpt = load_gguf(path)
    assert set(ckpt.tensors) == set(expected)
    for name, want in expected.items():
        got = ckpt.tensors[name]
        assert got.dtype == torch.float32
        assert ckpt.tensor_types[name] == types[name].name
        np.testing.assert_array_equal(got.numpy(), want.reshape(got.shape), err_msg=name)


def test_q4_1_stays_within_its_quantisation_step(synthetic):
    path, _, _ = synthetic
    got = load_gguf(path).tensors["t.q4_1"]
    rng = np.random.default_rng(0)
    original = rng.standard_normal((3, 256)).astype(np.float32)  # the first tensor written
    step = (np.ptp(original.reshape(3, -1, 32), axis=2) / 15).repeat(32, axis=1)
    assert np.all(np.abs(got.numpy() - original) <= step / 2 + 5e-3)


def test_skip_leaves_tensors_unread(synthetic):
    path, expected, _ = synthetic
    ckpt = load_gguf(path, skip=lambda n: n != "t.f32")
    assert list(ckpt.tensors) == ["t.f32"]
    assert set(ckpt.tensor_types) == set(expected)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(6 * 64 * 5, dtype=torch.float32).reshape(6 * 64, 5)
    for heads in (1, 3, 6):
        assert torch.equal(unpermute_qk(permute_qk(w, heads), heads), w)
        assert not torch.equal(permute_qk(w, heads), w)
    # Within a head, GGUF row 2i + j holds HF row j * d/2 + i.
    gguf_rows = permute_qk(torch.arange(64.0)[:, None], 1)[:, 0]
    assert gguf_rows[:4].tolist() == [0.0, 32.0, 1.0, 33.0]


def test_not_a_gguf_file_is_a_config_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError):
        load_gguf(bad)
    with pytest.raises(ConfigError):
        load_gguf(tmp_path / "missing.gguf")


def test_truncated_file_is_a_config_error(synthetic, tmp_path):
    path, _, _ = synthetic
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError):
        load_gguf(cut)
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError):
        load_gguf(cut)


def test_smollm2_header_matches_the_documented_file():
    meta, infos = read_header(gguf_path("smollm2"))
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (
        30, 576, 9, 3)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert Counter(i.qtype.name for i in infos) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert not any(i.name == "output.weight" for i in infos)  # tied embeddings
    embd = next(i for i in infos if i.name == "token_embd.weight")
    assert embd.shape == (49152, 576)
