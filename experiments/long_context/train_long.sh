#!/usr/bin/env bash
# Longer N for the sparse arms of experiments/long_context: the same 524,288-token budget at
# 64K (8 steps) and 128K (4 steps). sdpa is left out: one step at 64K takes ~143 s on one core,
# ~10 min at 128K (4 steps + validation: ~50 min). Run from the repository root.
. "$(dirname "$0")/run_lib.sh"
run() { run_job train "$@"; }  # run <folder> <overrides...>
for N in 65536 131072; do
  S=$((524288 / N))
  run dilated_$N experiment=long_context_sparse data.seq_len=$N task.max_steps=$S
  run ring_v3_$N experiment=long_context_sparse attention=ring_v3 attention.chunks=4 data.seq_len=$N task.max_steps=$S
done
