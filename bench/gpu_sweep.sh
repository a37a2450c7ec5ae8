#!/usr/bin/env bash
# Recipe sweep on a lent GPU machine (bench/plans/demo_recipes.yaml). Carries: .carry/whl (wheels
# the machine lacks), .carry/minilm (the MiniLM text encoder, fp16) and runs/demo/vae.
# Usage there: bash bench/gpu_sweep.sh SECONDS JOBS [PLAN]  (results and logs go to $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
plan=${3:-bench/plans/demo_recipes.yaml}
timeout "${1:-480}" python3 bench/sweep.py $plan --jobs "${2:-16}" --out "$OUT/sweep.json" \
  --var text_encoder=.carry/minilm
python3 bench/sweep.py $plan --collect --out "$OUT/curves.json"
tar czf "$OUT/logs.tgz" runs/sweep/logs runs/sweep/*/config.yaml 2>/dev/null
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
