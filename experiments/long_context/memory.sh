#!/usr/bin/env bash
# Memory arm of experiments/long_context: the peak memory of one LM training step
# (forward, loss, backward, AdamW step; batch 1) of the study's model at growing N,
# per variant, with the study's pattern. Run from the repository root.
. "$(dirname "$0")/run_lib.sh"
B="task=bench bench.target=model bench.warmup=0 bench.repeats=1 bench.baseline_sdpa=false bench.matmul_reference=false"
bench() { run_job memory "$@" $B; }  # bench <folder> <overrides...>
SPARSE="[2048,4096,8192,16384,32768,65536,131072]"
bench dilated experiment=long_context_sparse bench.seq_lens=$SPARSE
bench ring_v3 experiment=long_context_sparse attention=ring_v3 attention.chunks=4 bench.seq_lens=$SPARSE
bench sdpa experiment=long_context bench.seq_lens=[2048,4096,8192,16384,32768]
# sdpa at 64K on its own (one step is ~2.5 min on this CPU, run twice: timed + memory pass)
bench sdpa_65536 experiment=long_context bench.seq_lens=[65536]
