#!/usr/bin/env bash
# Issue 22's device check, one prepared run (about 10 minutes) on the GPU machine, from the repo root:
#   the cuda-marked engine tests (greedy equal to transformers in fp32 on the same GPU), the Triton attention
#   against the PyTorch reference on the GPU, then bench/gpu_bench.py (SmolLM2-135M and Llama-3.2-1B
#   configs, 256 x (128, 128) and batch-1 decode, against transformers and the HBM roofline).
#
# Prepared here first (the device tool's README): kvloom's runtime dependencies the image lacks, as wheels in
# .whl (gguf, fastapi, uvicorn, prometheus-client, llguidance, ...: `pip download --no-deps` for cp312
# manylinux), and a copy of ../shared/models/stories260K (the tests' tokenizer) in .carry/stories260K; both
# folders ignored by git (.git/info/exclude) and named in the run's carry. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export KVLOOM_STORIES=${KVLOOM_STORIES:-$PWD/.carry/stories260K}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_attention.py \
    tests/engine/test_cuda_backend.py 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | grep -v "^INFO" | tee "$OUT/bench.log"
