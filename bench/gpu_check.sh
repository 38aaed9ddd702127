#!/usr/bin/env bash
# One device call: kernel tests on the GPU, then the kernel benchmark. Logs go to $OUT when set.
# Usage: bash bench/gpu_check.sh [pytest args...]
set -o pipefail
OUT=${OUT:-/tmp/hybridserve_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/gpu -q -p no:cacheprovider -rf "$@" 2>&1 | tee "$OUT/pytest.log" | tail -40
python3 bench/ops.py --json-out "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log"
