#!/usr/bin/env bash
# Budget check of experiments/long_context: does the recall rise above chance at 2K with
# 8x the study's token budget (batch 8 x 2048 x 256 steps = 4,194,304 tokens)?
# Run from the repository root.
. "$(dirname "$0")/run_lib.sh"
run() { run_job longer "$@"; }  # run <folder> <overrides...>
L="data.seq_len=2048 task.batch_size=8 task.max_steps=256 task.warmup_steps=25 task.val_every_n_steps=64 task.val_batches=4"
run dilated_2048 experiment=long_context_sparse $L
run sdpa_2048 experiment=long_context $L
