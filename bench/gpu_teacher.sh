#!/usr/bin/env bash
# Full teacher speed benchmark on one GPU (issue 4 targets are for an H100): our DiT vs diffusers'
# PixArtTransformer2DModel at PixArt-Sigma XL/2, bf16, eager and torch.compile, all cases.
# Writes $OUT/bench_teacher.json and $OUT/bench_teacher.log when OUT is set; extra arguments go
# to bench_teacher.py (e.g. --compile-scope blocks for a faster compile, --grad-checkpointing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
ARGS=(--preset xl2 --device cuda --dtype bf16 --compile both --steps 20 --warmup 5)
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  "$PY" bench/bench_teacher.py "${ARGS[@]}" --json "$OUT/bench_teacher.json" "$@" \
    2>&1 | tee "$OUT/bench_teacher.log"
else
  "$PY" bench/bench_teacher.py "${ARGS[@]}" "$@"
fi
