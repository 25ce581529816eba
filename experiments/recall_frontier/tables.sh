#!/usr/bin/env bash
# The study's tables and plots from its run folders (after run.sh), with dilexp.compare only.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/recall_frontier}
HERE=experiments/recall_frontier
main=("$OUT/sdpa" "$OUT/dilated_r2" "$OUT/dilated_r4" "$OUT/block_sparse" "$OUT/same_function_improved" "$OUT/same_function_ring_v3")
python -m dilexp.compare "${main[@]}" --frontier --plot "$HERE/frontier.png" --out "$HERE/front.md"
python -m dilexp.compare "${main[@]}" --format md --out "$HERE/accuracy.md" \
  --metrics 'val/acc,val/chance,perf/tokens_per_s_median,perf/step_ms_median,memory/peak_rss_mb'
python -m dilexp.compare "${main[@]}" --format md --out "$HERE/by_distance.md" --metrics 'val/acc_dist/*'
python -m dilexp.compare "$OUT/width" --format md --out "$HERE/width.md" \
  --metrics 'val/acc,val/loss,perf/tokens_per_s_median'
