#!/usr/bin/env bash
# Reference-teacher training on a lent GPU machine (bench/gpu_reference_teacher.py), one call.
# Carries .whl (diffusers, jsonargparse and the few wheels the machine lacks) and .gpu (the
# reference VAE and the MiniLM text encoder in float16). Usage there:
#   bash bench/gpu_reference_teacher.sh SECONDS [driver arguments]     (results go to $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FEWSTEP_VAE=.gpu/vae FEWSTEP_TEXT_ENCODER=.gpu/minilm
nvidia-smi -L
budget=${1:-520}
shift
python3 bench/gpu_reference_teacher.py --budget "$budget" --out "$OUT" "$@"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
