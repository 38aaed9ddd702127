#!/usr/bin/env bash
# End to end through the HTTP server: `hybridserve serve` (dummy weights) + `hybridserve bench serve`,
# 1024-token random prompts, 1024 output tokens, at each concurrency of $CONCURRENCY (default "1 64").
# Results (vLLM-compatible JSON) and the server log go to $OUT.
#
# On the GPU machine (no fastapi/uvicorn/pydantic/msgspec/pyzmq there): carry `.whl` and start with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash bench/e2e_serve_gpu.sh
# Env: MODEL (nemotron-3-nano-30b-a3b), LOAD_FORMAT (dummy; dummy-uniform to compare with vLLM's
# dummy-weight numbers), MAX_NUM_SEQS (the largest concurrency), DEVICE (cuda), CONCURRENCY ("1 64"), PROMPTS_PER_LEVEL
# (default: 2 x concurrency, at least 4), INPUT_LEN / OUTPUT_LEN (1024), PORT (8011),
# MAX_MODEL_LEN (INPUT_LEN + OUTPUT_LEN + 16), SERVER_ARGS (more `serve` flags, e.g.
# --no-enable-prefix-caching), DATASET_ARGS (the timed runs' dataset flags instead of the random
# INPUT_LEN / OUTPUT_LEN ones, e.g. "--dataset-name multi_turn --multi-turn-num-turns 8"), WARMUP_ARGS
# (the warm-up's dataset flags instead of max-concurrency random INPUT_LEN prompts with 4 output tokens,
# e.g. the timed dataset with another --seed, so the kernels its shapes need compile before the timer).
set -o pipefail
OUT=${OUT:-/tmp/hybridserve_e2e_serve}
MODEL=${MODEL:-nemotron-3-nano-30b-a3b}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
DEVICE=${DEVICE:-cuda}
CONCURRENCY=${CONCURRENCY:-"1 64"}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-1024}
PORT=${PORT:-8011}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
max_c=$(echo $CONCURRENCY | tr ' ' '\n' | sort -n | tail -1)

t0=$(date +%s.%N)
python3 -m hybridserve.cli serve "$MODEL" --load-format "$LOAD_FORMAT" --device "$DEVICE" --port "$PORT" \
  --max-model-len "${MAX_MODEL_LEN:-$((INPUT_LEN + OUTPUT_LEN + 16))}" --max-num-seqs "${MAX_NUM_SEQS:-$max_c}" \
  $SERVER_ARGS >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT

# start-up: until /health says ready (200 once the engine has loaded and sized its caches)
python3 - "$PORT" "$server" <<'EOF' || { echo "server did not start"; tail -30 "$OUT/server.log"; exit 1; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(1200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()  # raises unless 200
        sys.exit(0)
    except Exception:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(1)
        time.sleep(0.5)
sys.exit(1)
EOF
t1=$(date +%s.%N)
echo "server start-up: $(python3 -c "print(round($t1 - $t0, 1))") s"
grep -iE "cache:|prefix cache|weights|memory|GiB" "$OUT/server.log" | head -6

# warm-up at the largest level's shapes (kernel compiles, CUDA-graph captures), result discarded; its own
# seed, so the timed prompts are not already in the prefix cache
python3 -m hybridserve.cli bench serve --base-url "http://127.0.0.1:$PORT" \
  ${WARMUP_ARGS:---dataset-name random --random-input-len "$INPUT_LEN" --random-output-len 4 --num-prompts "$max_c" --seed 1} \
  --max-concurrency "$max_c" --ignore-eos >"$OUT/warmup.log" 2>&1 || { echo "warm-up failed"; tail -20 "$OUT/warmup.log"; }

for c in $CONCURRENCY; do
  n=${PROMPTS_PER_LEVEL:-$(( c * 2 > 4 ? c * 2 : 4 ))}
  echo "=== concurrency $c, $n prompts ==="
  python3 -m hybridserve.cli bench serve --base-url "http://127.0.0.1:$PORT" \
    ${DATASET_ARGS:---dataset-name random --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN"} \
    --num-prompts "$n" --max-concurrency "$c" --ignore-eos --save-result --result-dir "$OUT" \
    --result-filename "serve_c${c}.json" 2>&1 | tail -36
done
