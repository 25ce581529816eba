#!/usr/bin/env bash
# The whole GPU measurement of issue 17 as one command (README.md beside this):
#   experiments/gpu/run.sh             one H100/H200, <= 8 minutes, results under $OUT
#   experiments/gpu/run.sh --dry-run   the same steps on CPU at tiny sizes (CI runs this)
# Steps: 1 wheels + versions, 2 pytest -m gpu, 3 attention benchmarks (bf16, D=64/128,
# fwd and fwd+bwd, N=8K/32K/128K) + cache and memory-pool pairs, 4 one gpt2_124m training
# step at T=8K (sdpa and improved), 5 tables under $OUT (8 files at most).
# A step that fails or runs past its time limit is logged and the script goes on: one
# GPU window must bring back everything that did work.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: experiments/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$(mktemp -d -t dilexp-gpu-XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t dilexp-gpu-work-XXXXXX)  # sweep folders: many files, so not under $OUT
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
LOG=$OUT/run.log
: > "$LOG"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# -- 1. wheels and versions -----------------------------------------------------------------
# Wheels carried in .whl/ (README.md: how to build the folder) go to a private site dir:
# the machine's own torch, lightning and triton stay as they are.
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d -t dilexp-site-XXXXXX)
  log "1: installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ROOT"/.whl/*.whl \
    >> "$LOG" 2>&1 || log "1: wheel install FAILED (see above)"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry_run: $DRY  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
from importlib.metadata import PackageNotFoundError, version
for name in ("lightning", "hydra-core", "omegaconf", "antlr4-python3-runtime", "wandb"):
    try:  # metadata only: importing lightning would cost seconds
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "MISSING")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| sm", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("device cpu (no CUDA)")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# BUDGET: seconds for steps 2-4 in all; each step also has its own limit (seconds), and gets
# at most what the budget has left, so the whole script ends in time whatever hangs.
if [[ $DRY == 1 ]]; then
  HW=cpu; DIMS=16; HEADS=4; SEQS="[256]"; SEG="[32,64,128]"; RATES="[1,2,4]"; SEG_LEN=32; SEG_BATCH=8
  REPEATS=2; MATMUL=256; PAIR_N="[256]"; MODEL=tiny; MODEL_T="[256]"; VOCAB=256; MEM_PAIR="memory=bucketed"
  BUDGET=600; SCALE=4  # a shared 2-core CPU: generous step limits, the budget still bounds the run
else
  HW=gpu; DIMS=64,128; HEADS=16; SEQS="[8192,32768,131072]"; SEG="[2048,4096,8192]"; RATES="[1,2,4]"
  SEG_LEN=2048; SEG_BATCH=64; REPEATS=3; MATMUL=8192; PAIR_N="[32768]"; MODEL=gpt2_124m; MODEL_T="[8192]"
  VOCAB=50304; MEM_PAIR="memory=torch"; BUDGET=440; SCALE=1
fi
T0=$SECONDS

limit_for() {  # limit_for STEP_LIMIT: the step's limit, cut to what the budget has left (0: skip)
  local left=$((BUDGET - (SECONDS - T0))) want=$(($1 * SCALE))
  if ((left < 15)); then echo 0; elif ((want < left)); then echo "$want"; else echo "$left"; fi
}

# -- 2. CUDA tests ------------------------------------------------------------------------------
log "2: pytest -m gpu"
# Only the files that hold gpu tests: collecting the whole suite costs more than the skips.
mapfile -t GPU_TESTS < <(grep -rlE "pytest\.mark\.gpu" tests --include="test_*.py" | sort)
timeout "$(limit_for 150)" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider "${GPU_TESTS[@]}" \
  > "$OUT/pytest.txt" 2>&1
log "2: pytest exit $? ($(tail -1 "$OUT/pytest.txt"))"

# -- 3./4. benchmarks: Hydra sweeps of task=bench, one process each ----------------------------
# Every variant runs at the pattern's per-segment length w/r = SEG_LEN for all its branches.
COMMON=(task=bench "hardware=$HW" logger=none bench.dtype=bfloat16 "bench.heads=$HEADS" bench.warmup=1
        "bench.repeats=$REPEATS" "bench.matmul_size=$MATMUL")
PATTERN=("attention.segment_lengths=$SEG" "attention.dilation_rates=$RATES")
# fwd_bwd first: the goals are about it, so a sweep cut short by its limit keeps those rows.
GRID=("bench.head_dim=$DIMS" bench.mode=fwd_bwd,fwd)

sweep() {  # sweep NAME STEP_LIMIT OVERRIDES...: one multirun into $WORK/NAME
  local name=$1 limit
  limit=$(limit_for "$2")
  shift 2
  if ((limit == 0)); then
    log "3: $name SKIPPED: out of time"
    return
  fi
  log "3: $name (limit ${limit}s)"
  timeout "$limit" "$PY" -m dilexp -m "${COMMON[@]}" "$@" "hydra.sweep.dir=$WORK/$name" > "$WORK/$name.log" 2>&1
  local rc=$?
  log "3: $name exit $rc"
  [[ $rc == 0 ]] || tail -5 "$WORK/$name.log" | tee -a "$LOG"
}

# In order of what the goals need most. SDPA at the per-segment length, with the batch that
# gives the tokens of the longest N, is the kernel ceiling the variants are held to.
sweep sdpa_segment 45 attention=sdpa "bench.seq_lens=[$SEG_LEN]" "bench.batch=$SEG_BATCH" \
  bench.baseline_sdpa=false "${GRID[@]}"
sweep dilated_improved 90 attention=improved,dilated "${PATTERN[@]}" "bench.seq_lens=$SEQS" \
  bench.baseline_sdpa=false "${GRID[@]}"
sweep ring_v3 60 attention=ring_v3 attention.chunks=4 "${PATTERN[@]}" "bench.seq_lens=$SEQS" \
  bench.baseline_sdpa=false "${GRID[@]}"
# 4: one LM training step (AdamW, bf16 autocast), improved with the sdpa model beside it.
sweep model 60 bench.target=model "model=$MODEL" attention=improved "${PATTERN[@]}" \
  "bench.seq_lens=$MODEL_T" bench.mode=fwd_bwd bench.baseline_sdpa=true "bench.vocab_size=$VOCAB"
# flex compiles once per shape (12 shapes): the slowest step on a cold machine.
sweep flex 120 attention=flex "${PATTERN[@]}" "bench.seq_lens=$SEQS" bench.baseline_sdpa=false "${GRID[@]}"
sweep sdpa_full 60 attention=sdpa "bench.seq_lens=$SEQS" bench.baseline_sdpa=false "${GRID[@]}"
# Pairs: the pattern cache (ring_v3's gpu cache vs none) and the buffer pool (vs none).
sweep cache_pair 30 attention=ring_v3 attention.chunks=4 "${PATTERN[@]}" "bench.seq_lens=$PAIR_N" \
  bench.head_dim=64 bench.mode=fwd_bwd bench.baseline_sdpa=false bench.compare_cache=none
sweep memory_pair 30 attention=improved "$MEM_PAIR" "${PATTERN[@]}" "bench.seq_lens=$PAIR_N" \
  bench.head_dim=64 bench.mode=fwd_bwd bench.baseline_sdpa=false bench.compare_memory=none

# -- 5. tables ---------------------------------------------------------------------------------
log "5: tables"
DRY_FLAG=(); [[ $DRY == 1 ]] && DRY_FLAG=(--dry-run)
"$PY" experiments/gpu/collect.py "$WORK" "$OUT" --seg-len "$SEG_LEN" "${DRY_FLAG[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
log "done: $OUT ($(ls "$OUT" | wc -l) files)"
exit "$rc"
