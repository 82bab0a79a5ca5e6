"""`parley bench gpu`'s own pieces, on a small shape in Triton's interpreter where there
is no CUDA: the device run must not be the first time its code runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from agent.bench import gpu
from agent.decoder.model import ModelArgs
from tests.decoder_fixtures import TRITON_DEVICE

SMALL = ModelArgs(arch="llama", n_layer=2, dim=128, n_head=4, n_kv_head=2,
                  intermediate_size=256, vocab_size=300, context_length=256,
                  tied_embeddings=False)


def test_the_tiny_model_check_agrees_with_the_reference() -> None:
    for result in gpu.check_tiny(TRITON_DEVICE):
        assert result["tokens_equal"], result
        assert result["max_rel_err"] < 1e-4, result


def test_the_random_pair_holds_the_same_weights_and_decodes() -> None:
    parley, base = gpu.build_8b_pair(SMALL, TRITON_DEVICE, baseline_dtype=torch.float32)
    agreement = gpu.compare_models(parley, base)
    assert agreement["cosine"] > 0.9999 and agreement["top1_equal"] == 1.0
    # Weights read per step: NF4 linears (codes + scales) and the 8-bit head, far fewer
    # bytes than the float32 baseline's.
    assert gpu.step_bytes(parley, SMALL, 8) < gpu.step_bytes(base, SMALL, 8) / 4
    for model in (parley, base):
        assert gpu.decode_tokens_per_s(model, batch=3, steps=2, context=8) > 0
