"""Shared fixtures. Models load once per session; every test uses the real ones."""

from __future__ import annotations

import os

import pytest

# Two cores: keep BLAS/ONNX/torch from oversubscribing when tests run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, on CPU tensors: set before
# any kernel module is imported (it is read when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from agent.config import Settings, load_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings a default install runs with (models from the shared cache folder)."""
    return load_settings(environ={k: v for k, v in os.environ.items()
                                  if k.startswith("PARLEY_CACHE") or k == "XDG_CACHE_HOME"})
