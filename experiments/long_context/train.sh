#!/usr/bin/env bash
# Training arm of experiments/long_context: 3 variants x N in {2K, 8K, 32K}, every run
# 524,288 training tokens (batch 1 x N x steps). Run from the repository root.
# Each run is wrapped in flock so that it never shares its core with another measuring job.
. "$(dirname "$0")/run_lib.sh"
run() { run_job train "$@"; }  # run <folder> <overrides...>
for N in 2048 8192 32768; do
  S=$((524288 / N))
  run dilated_$N experiment=long_context_sparse data.seq_len=$N task.max_steps=$S
  run ring_v3_$N experiment=long_context_sparse attention=ring_v3 attention.chunks=4 data.seq_len=$N task.max_steps=$S
done
for N in 2048 8192 32768; do
  S=$((524288 / N))
  run sdpa_$N experiment=long_context data.seq_len=$N task.max_steps=$S
done
