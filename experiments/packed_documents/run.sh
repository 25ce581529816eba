#!/usr/bin/env bash
# The packed_documents study (issue 18), CPU. Run from the repository root:
#   bash experiments/packed_documents/run.sh [OUT]      (default OUT=/tmp/packed_documents)
# then: python experiments/packed_documents/collect.py OUT
set -euo pipefail
OUT=${1:-/tmp/packed_documents}
PY=${PY:-python}
mkdir -p "$OUT"
COMMON=(task=bench bench.heads=4 bench.head_dim=32 bench.batch=1 bench.warmup=1 bench.repeats=5
        bench.baseline_sdpa=false bench.matmul_reference=false bench.memory_pass=false hardware.threads=1
        logger=none)

# 1. One attention layer: distributions x variants at N = 4K, 16K; cache=cpu against cache=none
#    (bench.compare_cache), each against the same tokens without documents (the nodocs twin).
for dist in uniform:128-1024 lognormal:512; do
  for v in sdpa improved flex ring_v3; do
    mode=fwd_bwd; extra=()
    [ "$v" = flex ] && mode=fwd              # flex has no backward on CPU
    [ "$v" = ring_v3 ] && extra=(attention.chunks=4)
    [ "$v" = sdpa ] || extra+=(bench.compare_cache=none)
    nice -n 19 $PY -m dilexp "${COMMON[@]}" attention=$v "${extra[@]}" cache=cpu bench.mode=$mode \
      bench.seq_lens=[4096,16384] bench.docs=$dist hydra.run.dir="$OUT/attn_${v}_${dist/:/_}"
  done
done

# 2. One LM training step (model=tiny, 2 layers) at N = 4K: the layout's build share with
#    cache none / local / cpu (local: one cache per layer, cpu: one for all layers).
for v in improved ring_v3; do
  extra=(); [ "$v" = ring_v3 ] && extra=(attention.chunks=4)
  nice -n 19 $PY -m dilexp "${COMMON[@]}" bench.target=model model=tiny attention=$v "${extra[@]}" \
    cache=cpu bench.compare_cache=none bench.seq_lens=[4096] bench.docs=lognormal:512 \
    hydra.run.dir="$OUT/model_${v}_cpu"
  nice -n 19 $PY -m dilexp "${COMMON[@]}" bench.target=model model=tiny attention=$v "${extra[@]}" \
    cache=local bench.seq_lens=[4096] bench.docs=lognormal:512 hydra.run.dir="$OUT/model_${v}_local"
done

# 3. The causal LM on a document corpus: with vs without document masks, same tokens
#    (SKIP_LM=1 leaves it out, e.g. to run it on its own alongside).
[ -n "${SKIP_LM:-}" ] && exit 0
for seed in 0 1 2; do
  nice -n 19 $PY experiments/packed_documents/lm.py --text ../shared/data/tinyshakespeare.txt \
    --out "$OUT/lm_s$seed" --seed $seed --steps 150 --batch 8 --seq-len 512
done
