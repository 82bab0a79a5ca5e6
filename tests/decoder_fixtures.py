"""Decoder test helpers: the real bundled GGUF models, loaded once per test session.

The tests' ground truth is the float32 model on the dequantised GGUF weights (backend
"fp32"): the NF4 kernels have their own tests against it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from agent import assets
from agent.config import load_settings
from agent.decoder.engine import Engine, load_engine
from agent.errors import ModelMissingError

FIXTURES = Path(__file__).parent / "fixtures"
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
