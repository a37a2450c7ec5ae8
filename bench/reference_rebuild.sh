#!/usr/bin/env bash
# Rebuild (or resume) the reference teacher's chain on the CPU, stage by stage, skipping what is
# already there: the 50,000-sample cache of the shipped reference VAE (fewstep/assets/reference_vae;
# finished shards are kept), then the teacher run of the given recipe overlay, resumed from its
# exact last.ckpt when one exists. The overlay's first comment lines name its config chain
# (`# fewstep fit -c BASE ... -c OVERLAY`), as every configs/teacher/shapes_reference_*.yaml does;
# the run name is its logger name. Caches other than the uniform reference one are named there
# too, one `# fewstep cache -c ...` command each (continuation lines allowed); every one is built
# (or finished) before the teacher.
# The run folders live in $FEWSTEP_RUNS/reference (default /root/fewstep_runs), linked as
# runs/reference, because the work tree is laid anew each session. Usage:
#   bash bench/reference_rebuild.sh [OVERLAY.yaml] [extra `fewstep fit` args...]
# default overlay: configs/teacher/shapes_reference_refiner_scratch.yaml (run teacher_r3).
# Threads: OMP_NUM_THREADS (default 2). Stop the teacher with SIGTERM for an exact last.ckpt.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
FEWSTEP=${FEWSTEP:-.venv/bin/fewstep}
RUNS=${FEWSTEP_RUNS:-/root/fewstep_runs}
OVERLAY=${1:-configs/teacher/shapes_reference_refiner_scratch.yaml}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }

[ -f "$OVERLAY" ] || { echo "$OVERLAY: no such recipe overlay (see configs/teacher/)" >&2; exit 2; }
RUN=$(sed -n 's/^ *init_args: {name: \([A-Za-z0-9_.-]*\)}$/\1/p' "$OVERLAY" | tail -1)
[ -n "$RUN" ] || { echo "$OVERLAY: set trainer.logger.init_args.name (the run to resume)" >&2; exit 2; }
# the leading comment's commands, one a line (continuation lines joined)
HEADER=$(sed -n '/^#/!q;s/^# *//;p' "$OVERLAY" | sed -e ':a' -e '/\\$/N; s/\\\n *//; ta')
configs_of() { grep -o -- '-c [^ \\)]*' <<<"$1" | cut -c4- || true; }
FIT=$(grep -m1 '^fewstep fit ' <<<"$HEADER" || true)
mapfile -t CACHES < <(grep '^fewstep cache ' <<<"$HEADER" || true)
[ ${#CACHES[@]} -gt 0 ] || CACHES=("fewstep cache -c configs/cache/shapes.yaml -c configs/cache/shapes_reference.yaml")
for config in $(configs_of "$FIT") $(for cache in "${CACHES[@]}"; do configs_of "$cache"; done); do
  [ -f "$config" ] || { echo "$OVERLAY: its header names $config, which does not exist" >&2; exit 2; }
done
CHAIN=()
for config in $(configs_of "$FIT"); do CHAIN+=(-c "$config"); done
[ ${#CHAIN[@]} -gt 0 ] && [ "${CHAIN[-1]}" = "$OVERLAY" ] || {
  echo "$OVERLAY: name its config chain in its first comment lines, ending with itself:" >&2
  echo "  # fewstep fit -c configs/teacher/shapes.yaml ... -c $OVERLAY" >&2
  exit 2
}
mkdir -p "$RUNS/reference" runs
[ -e runs/reference ] || ln -sfn "$RUNS/reference" runs/reference
VAE=fewstep/assets/reference_vae  # the caches and the teacher read the shipped VAE
[ -f $VAE/config.json ] || {
  echo "$VAE: the shipped reference VAE is missing; restore it: git checkout -- $VAE" >&2
  exit 2
}
for cache in "${CACHES[@]}"; do
  CACHE_CHAIN=()
  for config in $(configs_of "$cache"); do CACHE_CHAIN+=(-c "$config"); done
  echo "== cache (${CACHE_CHAIN[-1]}; finished shards are kept)" >&2
  run "$FEWSTEP" cache "${CACHE_CHAIN[@]}"
done
LAST=runs/reference/$RUN/checkpoints/last.ckpt
RESUME=()
[ -f "$LAST" ] && RESUME=(--ckpt_path "$LAST")
echo "== teacher $RUN${RESUME:+ (resumed from $LAST)}" >&2
run "$FEWSTEP" fit "${CHAIN[@]}" "${RESUME[@]}" "$@"
