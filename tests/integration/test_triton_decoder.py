"""The whole decoder through the Triton kernels (in Triton's interpreter without CUDA), on
tiny random-weight models of the bundled architecture, against the PyTorch reference.

What runs is what `llm_backend = "triton"` (and "auto" on a CUDA machine) loads: the
engine, its weight formats (the GGUF's own Q4_1 blocks; NF4 and the 8-bit head for float
weights), the token attention kernel and its float16 KV cache, the prompt through
PyTorch's attention, decode steps through the static-buffer path that CUDA graphs capture.

Tolerances: against the float32 model on the same weights with a float16 KV cache, only
summation order differs, so logits agree to 1e-5 of their largest value (measured:
2e-7 to 9e-7) and greedy tokens are equal; against the all-float32 reference (float32
cache) to 1e-3 (measured: 2e-4 to 3e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from agent.bench.gpu import greedy_logits
from agent.decoder.cuda_graphs import DecodeRunner
from agent.decoder.engine import Engine, load_engine
from tests.decoder_fixtures import gguf_path
from tests.tiny_model import write_tiny_gguf

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
STEPS = 10


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    source = gguf_path("smollm2")
    files = {"q4_1": folder / "tiny-q4_1.gguf", "f32": folder / "tiny-f32.gguf",
             "qwen2": folder / "tiny-qwen2-q8_0.gguf"}
    write_tiny_gguf(files["q4_1"], source, linear_type="Q4_1", seed=1)
    write_tiny_gguf(files["f32"], source, linear_type="F32", seed=2)
    write_tiny_gguf(files["qwen2"], source, linear_type="Q8_0", arch="qwen2", seed=3)
    return files


def engines(path: Path, settings, reference: str = "fp32") -> tuple[Engine, Engine]:
    triton_engine = load_engine(path, settings=settings, backend="triton", progress=False)
    return triton_engine, load_engine(path, settings=settings, backend=reference,
                                      progress=False)


def greedy_run(engine: Engine, ids: list[int], *, static: bool = False,
               cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[int]]:
    if cache_dtype is not None:
        engine.model.cache_dtype = cache_dtype
    return greedy_logits(engine.model, ids, STEPS, static=static)


def close(got: torch.Tensor, want: torch.Tensor, of_range: float) -> bool:
    return float((got - want).abs().max()) <= of_range * float(want.abs().max())


@pytest.mark.parametrize("name", ["q4_1", "f32", "qwen2"])
def test_the_triton_model_gives_the_references_logits_and_tokens(tiny_files, settings,
                                                                 name: str) -> None:
    tri, ref = engines(tiny_files[name], settings,
                       reference="reference" if name == "f32" else "fp32")
    assert tri.backend == "triton" and tri.model.cache_dtype == torch.float16
    assert tri.weights == {"q4_1": "native (Q4_1)", "f32": "nf4+q8",
                           "qwen2": "native (Q8_0)"}[name]
    ids = tri.encode_prompt(PROMPT)
    got_logits, got = greedy_run(tri, ids, static=True)
    f32_logits, _ = greedy_run(ref, ids)
    assert close(got_logits, f32_logits, 1e-3)
    want_logits, want = greedy_run(ref, ids, cache_dtype=torch.float16)
    assert close(got_logits, want_logits, 1e-5)
    assert got == want


def test_batched_decode_with_padding_equals_each_row_alone(tiny_files, settings) -> None:
    """Three streams at different positions in one static step of bucket 4 (one padding
    row) give each stream's own logits, and the padding row writes nothing."""
    tri = load_engine(tiny_files["q4_1"], settings=settings, backend="triton", progress=False)
    model = tri.model
    prompts = [tri.encode_prompt(p) for p in ("Hello there", "A longer prompt than that",
                                              "Three")]
    cache = model.new_cache(4, 128)
    decode = DecodeRunner(model, cache, static=True)
    with torch.inference_mode():
        firsts = [int(model(torch.tensor([p]), cache, [s], [0])[0].argmax())
                  for s, p in enumerate(prompts)]
        spare = cache.k[:, 3].view(torch.int16).clone()  # bits: never-written slots hold NaNs
        batched = decode(firsts, [0, 1, 2], [len(p) for p in prompts])
        assert torch.equal(cache.k[:, 3].view(torch.int16), spare)
        assert cache.lengths[:3] == [len(p) + 1 for p in prompts]
        for s, p in enumerate(prompts):
            cache.truncate(s, len(p))
            alone = model(torch.tensor([[firsts[s]]]), cache, [s], [len(p)])
            assert close(batched[s:s + 1], alone, 1e-5)


def test_auto_picks_triton_where_cuda_is(monkeypatch) -> None:
    from agent.decoder.kernels import auto_backend_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_backend_name() == "triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_backend_name() == "cpu"
