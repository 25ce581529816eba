#!/usr/bin/env bash
# experiments/recall_frontier: every arm of the study, as Hydra multiruns into one folder each.
#   bash experiments/recall_frontier/run.sh [ARM...]     (default: every arm; from the repo root)
# Two arms may run at once on a 2-core machine: each job uses one thread (hardware.threads=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/recall_frontier}
SEEDS=${SEEDS:-1,2,3}

sweep() {  # sweep <arm> <overrides...>: the arm's seeds (SEEDS, or seed=... among the overrides)
  local arm=$1; shift
  local seeds="seed=$SEEDS"
  case " $* " in *" seed="*) seeds="" ;; esac
  python -m dilexp -m experiment=recall_frontier hardware.threads=1 ${seeds:+"$seeds"} "$@" \
    hydra.sweep.dir="$OUT/$arm" +resume=true
}

arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(sdpa dilated_r2 dilated_r4 block_sparse same_function width)
for arm in "${arms[@]}"; do
  case $arm in
    sdpa) sweep sdpa attention=sdpa ;;
    # Two densities of the LongNet pattern (one pair per head, heads=grouped): a 64-token local window
    # plus the whole sequence at every 2nd (r2) or every 4th (r4) position.
    dilated_r2) sweep dilated_r2 attention=dilated 'attention.segment_lengths=[64,256]' 'attention.dilation_rates=[1,2]' ;;
    dilated_r4) sweep dilated_r4 attention=dilated 'attention.segment_lengths=[64,256]' 'attention.dilation_rates=[1,4]' ;;
    block_sparse) sweep block_sparse attention=block_sparse attention.block_size=32 ;;
    # improved and ring_v3 compute dilated_r2's function: one seed each must give its numbers.
    # (One sweep per variant: a swept attention group cannot take the pattern's overrides.)
    same_function) for v in improved ring_v3; do
                     sweep "same_function_$v" attention=$v 'attention.segment_lengths=[64,256]' \
                       'attention.dilation_rates=[1,2]' seed=1
                   done ;;
    # Zoology's finding: attention solves the task without growing width (sdpa, d=64 and 128).
    width) sweep width attention=sdpa model.d_model=64,128 data.seq_len=64,128,256 task.max_steps=2000 seed=1 ;;
    # The goal's learning curve: sdpa at N=256 for 12000 steps (4x the frontier's budget), one seed.
    long) sweep long attention=sdpa task.max_steps=12000 task.val_every_n_steps=1000 seed=1 ;;
    # N=1024: full attention and the same pattern shape (64-token window + every 2nd position), one seed.
    n1024_sdpa) sweep n1024_sdpa attention=sdpa data.seq_len=1024 task.max_steps=500 seed=1 ;;
    n1024_dilated) sweep n1024_dilated attention=dilated data.seq_len=1024 'attention.segment_lengths=[64,1024]' \
                     'attention.dilation_rates=[1,2]' task.max_steps=500 seed=1 ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
done
