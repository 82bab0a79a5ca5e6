#!/bin/sh
# The prepared device run for the decoder on CUDA (one call of the device tool, from the
# repository root, with `.whl` carried: the gguf wheel the GPU image lacks).
#   1. the GPU-only tests and the Triton kernel tests, on CUDA;
#   2. `parley bench gpu`: correctness on CUDA, then the timings for the README.
# Output and the JSON land in $OUT (or ./gpu-out).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_kernels_triton.py \
    2>&1 | tail -25 | tee "$out/tests.txt"
timeout 420 python3 -m agent.bench.gpu --json "$out/gpu.json" 2>&1 | tee "$out/bench.txt"
