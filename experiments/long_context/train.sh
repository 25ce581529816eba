#!/usr/bin/env bash
# Training arm of experiments/long_context: 3 variants x N in {2K, 8K, 32K}, every run
# 524,288 training tokens (batch 1 x N x steps). Run from the repository root.
# Each run is wrapped in flock so that it never shares its core with another measuring job.
set -u
LOCK=${LOCK:-/tmp/dilexp_lc.lock}
run() {  # run <folder> <overrides...>
  local dir=outputs/long_context/train/$1; shift
  flock "$LOCK" python -m dilexp "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1
  echo "$(date -u +%H:%M:%S) $dir rc=$? load=$(cut -d' ' -f1-3 /proc/loadavg)"
}
mkdir -p outputs/long_context/train
for N in 2048 8192 32768; do
  S=$((524288 / N))
  run dilated_$N experiment=long_context_sparse data.seq_len=$N task.max_steps=$S
  run ring_v3_$N experiment=long_context_sparse attention=ring_v3 attention.chunks=4 data.seq_len=$N task.max_steps=$S
done
for N in 2048 8192 32768; do
  S=$((524288 / N))
  run sdpa_$N experiment=long_context data.seq_len=$N task.max_steps=$S
done
