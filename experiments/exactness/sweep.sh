#!/usr/bin/env bash
# The exactness study: task=check for every variant x world size x dtype (see README.md).
#   bash experiments/exactness/sweep.sh            # CPU: gloo ranks (this report)
#   ACCEL=gpu bash experiments/exactness/sweep.sh  # GPUs: the same sweep over NCCL ranks
#   SWEEP_GROUPS="ring_chunks sdpa" bash experiments/exactness/sweep.sh   # some groups only
# Each group is one Hydra multirun into $OUT/<group>; tables.py reads every summary.json below $OUT.
set -u
cd "$(dirname "$0")/../.."
ACCEL=${ACCEL:-cpu}
OUT=${OUT:-outputs/exactness}
N=${N:-4096}          # the grid's length; N8K=8192 for the long ring rows
PY=${PY:-python}
# 4 heads of 32 (the default LM's head shape), one sequence; segments 1/4, 1/2 and all of N: with
# 2+ ranks every segment but the shortest spans shards, so K/V travel and partials merge.
shape() { echo "data.seq_len=$1 model.n_head=4 model.d_model=128 task.batch_size=1"; }
dil() { echo "attention.segment_lengths=[$(($1/4)),$(($1/2)),$1] attention.dilation_rates=[1,2,4]"; }
common="task=check logger=csv hardware.threads=1 ++hardware.timeout_s=600"
precs="hardware.precision=32-true,bf16-mixed"

# (Not GROUPS: bash keeps the user's group ids there and ignores assignments.)
SWEEP_GROUPS=${SWEEP_GROUPS:-ring_world ring_chunks dilated_family sdpa block_sparse ring_world_8k}
run() { # group, overrides...
  local group=$1; shift
  case " $SWEEP_GROUPS " in *" $group "*) ;; *) return 0 ;; esac
  echo "== $group"
  $PY -m dilexp -m $common "$@" "hydra.sweep.dir=$OUT/$group"
}

# 1. ring variants over 1, 2, 4, 8 ranks (gloo on CPU, NCCL with ACCEL=gpu)
run ring_world $(shape $N) $(dil $N) attention=ring_v2,ring_v3 hardware=cp hardware.accelerator=$ACCEL \
  hardware.devices=1,2,4,8 $precs
# 2. the single-process ring over 1, 2, 4, 8 chunks
run ring_chunks $(shape $N) $(dil $N) attention=ring_v2,ring_v3 attention.chunks=1,2,4,8 \
  hardware.accelerator=$ACCEL hardware.devices=1 $precs
# 3. every other variant in one process (flex: forward only on CPU)
run dilated_family $(shape $N) $(dil $N) attention=dilated,improved,flex hardware.accelerator=$ACCEL \
  hardware.devices=1 $precs
run sdpa $(shape $N) attention=sdpa hardware.accelerator=$ACCEL hardware.devices=1 $precs
run block_sparse $(shape $N) attention=block_sparse hardware.accelerator=$ACCEL hardware.devices=1 $precs
# 4. N = 8K: the ring over 1, 2, 4, 8 ranks
N8K=${N8K:-8192}
run ring_world_8k $(shape $N8K) $(dil $N8K) attention=ring_v2 hardware=cp hardware.accelerator=$ACCEL \
  hardware.devices=1,2,4,8 $precs
$PY experiments/exactness/tables.py "$OUT"
