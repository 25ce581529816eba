#!/usr/bin/env bash
# Budget check of experiments/long_context: does the recall rise above chance at 2K with
# 8x the study's token budget (batch 8 x 2048 x 256 steps = 4,194,304 tokens)?
# Run from the repository root.
set -u
LOCK=${LOCK:-/tmp/dilexp_lc.lock}
run() {  # run <folder> <overrides...>
  local dir=outputs/long_context/longer/$1; shift
  flock "$LOCK" python -m dilexp "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1
  echo "$(date -u +%H:%M:%S) $dir rc=$? load=$(cut -d' ' -f1-3 /proc/loadavg)"
}
mkdir -p outputs/long_context/longer
L="data.seq_len=2048 task.batch_size=8 task.max_steps=256 task.warmup_steps=25 task.val_every_n_steps=64 task.val_batches=4"
run dilated_2048 experiment=long_context_sparse $L
run sdpa_2048 experiment=long_context $L
