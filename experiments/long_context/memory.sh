#!/usr/bin/env bash
# Memory arm of experiments/long_context: the peak memory of one LM training step
# (forward, loss, backward, AdamW step; batch 1) of the study's model at growing N,
# per variant, with the study's pattern. Run from the repository root.
set -u
LOCK=${LOCK:-/tmp/dilexp_lc.lock}
B="task=bench bench.target=model bench.warmup=0 bench.repeats=1 bench.baseline_sdpa=false bench.matmul_reference=false"
bench() {  # bench <folder> <overrides...>
  local dir=outputs/long_context/memory/$1; shift
  flock "$LOCK" python -m dilexp "$@" $B hydra.run.dir="$dir" > "$dir.log" 2>&1
  echo "$(date -u +%H:%M:%S) $dir rc=$? load=$(cut -d' ' -f1-3 /proc/loadavg)"
}
mkdir -p outputs/long_context/memory
SPARSE="[2048,4096,8192,16384,32768,65536,131072]"
bench dilated experiment=long_context_sparse bench.seq_lens=$SPARSE
bench ring_v3 experiment=long_context_sparse attention=ring_v3 attention.chunks=4 bench.seq_lens=$SPARSE
bench sdpa experiment=long_context bench.seq_lens=[2048,4096,8192,16384,32768]
# sdpa at 64K on its own (one step is ~2.5 min on this CPU, run twice: timed + memory pass)
bench sdpa_65536 experiment=long_context bench.seq_lens=[65536]
