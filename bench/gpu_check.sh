#!/usr/bin/env bash
# One device call: kernel tests on the GPU, then the kernel benchmark. Logs go to $OUT when set.
# Usage: [OPS_ARGS=--sweep] [E2E_ARGS="--concurrency 1 64"] bash bench/gpu_check.sh [pytest args...]
set -o pipefail
OUT=${OUT:-/tmp/hybridserve_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest tests/gpu -q -p no:cacheprovider -rf "$@" 2>&1 | tee "$OUT/pytest.log" | tail -40
python3 bench/ops.py ${OPS_ARGS:-} --json-out "$OUT/ops.json" --md-out "$OUT/ops.md" 2>&1 | tee "$OUT/ops.log"
# optional end-to-end run (E2E_ARGS="--concurrency 1 64" etc.; E2E_TIMEOUT seconds)
if [ -n "${E2E_ARGS+x}" ]; then
  timeout "${E2E_TIMEOUT:-420}" python3 bench/e2e_gpu.py $E2E_ARGS --json-out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | grep -v "^\s*$" | tail -30
fi
