"""Decoder test helpers: the real bundled GGUF models, loaded once per test session.

The tests' ground truth is the float32 model on the dequantised GGUF weights (backend
"fp32"): the NF4 kernels have their own tests against it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from agent import assets
from agent.config import load_settings
from agent.decoder.engine import Engine, load_engine
from agent.errors import ModelMissingError

FIXTURES = Path(__file__).parent / "fixtures"
# Block types with a per-block minimum (an offset) besides the scale.
WITH_MIN = (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K)
# Where the Triton kernels' tests run: CUDA when there is one, else the interpreter on the
# CPU (tests/conftest.py sets TRITON_INTERPRET=1 then).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@functools.cache
def fp32_engine(name: str = "smollm2") -> Engine:
    return load_engine(name, settings=load_settings(), backend="fp32", progress=False)


def gguf_path(name: str) -> Path:
    try:
        return assets.resolve(name, load_settings().cache_dir)
    except ModelMissingError as exc:
        pytest.skip(f"{name} is not installed: {exc.message}")


def engine_or_skip(name: str) -> Engine:
    gguf_path(name)
    return fp32_engine(name)


def fixture_json(name: str) -> Any:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {name} not generated yet (see tests/fixtures/*.py)")
    return json.loads(path.read_text())


# llama.cpp's ids: tokenizer_*.json (special=True, tests/fixtures/make_tokenizer_fixtures.py)
# and the special=False strings in llama_cpp_logits_*.json (make_llama_cpp_logits.py).
FIXTURE_FILES = {"smollm2": "tokenizer_smollm2.json", "qwen2.5-coder-0.5b": "tokenizer_qwen2.json"}


def llama_cpp_token_cases(name: str) -> list[dict]:
    """Strings with the ids llama.cpp gives them, and whether special tokens are parsed."""
    cases = []
    path = FIXTURES / FIXTURE_FILES[name]
    if path.is_file():
        cases += [{**c, "special": c.get("special", True)} for c in json.loads(path.read_text())]
    logits = FIXTURES / f"llama_cpp_logits_{name}.json"
    if logits.is_file():
        data = json.loads(logits.read_text())
        cases += [{**c, "special": False} for c in data.get("plain_tokenization", [])]
        cases += [{"text": c["text"], "ids": c["ids"], "special": True} for c in data["cases"]]
    if not cases:
        pytest.skip(f"no llama.cpp tokenizer fixtures for {name} yet")
    return cases


def random_blocks(qtype: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid blocks: random bytes, with finite float16 factors of a weight's size."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)

    def half() -> np.ndarray:
        values = rng.uniform(-0.05, 0.05, (n, k // block)).astype(np.float16)
        return values.view(np.uint8).reshape(n, k // block, 2)

    if qtype == Q.Q6_K:
        raw[..., 208:210] = half()
    else:
        raw[..., 0:2] = half()
        if qtype in WITH_MIN:
            raw[..., 2:4] = half()
    return raw.reshape(n, -1)
