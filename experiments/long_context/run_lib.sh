# Sourced by the scripts of experiments/long_context: one runner for every arm.
# run <arm> <folder> <overrides...>: one dilexp job into outputs/long_context/<arm>/<folder>,
# under flock so it never shares its core with another measuring job; prints rc and load.
set -u
LOCK=${LOCK:-/tmp/dilexp_lc.lock}
run_job() {
  local dir=outputs/long_context/$1/$2; shift 2
  mkdir -p "$(dirname "$dir")"
  flock "$LOCK" python -m dilexp "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1
  echo "$(date -u +%H:%M:%S) $dir rc=$? load=$(cut -d' ' -f1-3 /proc/loadavg)"
}
