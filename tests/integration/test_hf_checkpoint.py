"""Hugging Face checkpoint folders: the shape, the tokenizer and the NF4 weights a user's
16-bit safetensors give must be what the same weights give from a GGUF.

The folders are written from the bundled GGUFs (tests/hf_checkpoint.py): the F32 one
holds exactly the GGUF's dequantised values, so its NF4 weights and its replies must equal
the GGUF's under `llm_weights = "nf4"` bit for bit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agent.decoder.engine import load_engine, source_tensor_types
from agent.decoder.generate import generate
from agent.decoder.gguf_loader import read_header
from agent.decoder.hf_loader import model_args, read_vocabulary
from agent.decoder.model import ModelArgs
from agent.decoder.quantize import QuantLinear, planned_format, resolve_weights
from agent.decoder.sampling import SamplingParams
from agent.decoder.tokenizer import Tokenizer
from tests.decoder_fixtures import QUESTION, gguf_path, llama_cpp_token_cases
from tests.hf_checkpoint import write_checkpoint

MODELS = ("smollm2", "qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def smol_f32(tmp_path_factory) -> Path:
    """SmolLM2's values in F32, two shards, the tied head written out as HF exporters do.

    safetensors output is deterministic, so the folder's sha256 (the NF4 cache key) is the
    same on every run and its NF4 quantisation (about a minute) is paid once per cache.
    """
    return write_checkpoint(gguf_path("smollm2"), tmp_path_factory.mktemp("smol") / "smol",
                            torch.float32, shards=2)


@pytest.mark.parametrize("name", MODELS)
def test_config_and_tokenizer_files_give_the_ggufs_model_and_llama_cpps_ids(name, tmp_path):
    import json

    folder = write_checkpoint(gguf_path(name), tmp_path / name, torch.bfloat16, weights=False)
    meta, infos = read_header(gguf_path(name))
    config = json.loads((folder / "config.json").read_text())
    args = model_args(config, set())
    assert args == ModelArgs.from_gguf(meta, {i.name for i in infos})
    tokenizer = Tokenizer(read_vocabulary(folder, config, args.vocab_size))
    reference = Tokenizer.from_metadata(meta)
    assert tokenizer.vocab.types == reference.vocab.types  # CONTROL, USER_DEFINED, padding
    assert (tokenizer.bos_id, tokenizer.eos_id) == (reference.bos_id, reference.eos_id)
    wrong = [(c["text"], tokenizer.encode(c["text"], special=c["special"]), c["ids"])
             for c in llama_cpp_token_cases(name)
             if tokenizer.encode(c["text"], special=c["special"]) != c["ids"]]
    assert not wrong, wrong[:3]
    chat = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert tokenizer.encode_chat(chat) == reference.encode_chat(chat)


def test_a_16_bit_checkpoint_runs_in_nf4_by_default(smol_f32, tmp_path):
    bf16 = write_checkpoint(gguf_path("smollm2"), tmp_path / "bf16", torch.bfloat16)
    for folder, dtype in ((smol_f32, "F32"), (bf16, "BF16")):
        types = source_tensor_types(folder)
        assert set(types.values()) == {dtype}
        assert "output.weight" not in types  # tied: the written-out head is the embedding
        assert resolve_weights("auto", types) == "nf4"
        assert planned_format("native", types) == "fp32"


def test_an_f32_checkpoint_gives_its_ggufs_nf4_weights_and_replies(smol_f32, settings):
    checkpoint = load_engine(smol_f32, settings=settings, progress=False)
    assert checkpoint.weights == "nf4+q8" and checkpoint.name == smol_f32.name
    gguf = load_engine("smollm2", settings=replace(settings, llm_weights="nf4"),
                       progress=False)
    ours = [m.quant_weight for m in checkpoint.model.modules() if isinstance(m, QuantLinear)]
    theirs = [m.quant_weight for m in gguf.model.modules() if isinstance(m, QuantLinear)]
    assert len(ours) == len(theirs) == 4 * 30 + 1
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert torch.equal(checkpoint.model.tok_embeddings.weight, gguf.model.tok_embeddings.weight)

    params = SamplingParams(temperature=0.0, max_tokens=32)
    replies = []
    for engine in (checkpoint, gguf):
        prompt = engine.tokenizer.encode_chat(QUESTION)
        replies.append([t for d in generate(engine.model, engine.tokenizer, prompt, params)
                        for t in d.token_ids])
    assert replies[0] == replies[1] and len(replies[0]) > 4
