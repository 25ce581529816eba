#!/usr/bin/env bash
# Stop what tests/slurm/start.sh DIR started (by the pid files in DIR); DIR itself stays.
set -uo pipefail

dir=${1:?usage: stop.sh DIR}
dir=$(cd "$dir" && pwd) || exit 0
# Jobs first (a test that failed half-way may leave some running): slurmd's steps would outlive it.
if [[ -f $dir/slurmctld.pid ]] && command -v scancel >/dev/null; then
    export SLURM_CONF="$dir/slurm.conf"
    scancel --quiet --full --user="$(id -un)" 2>/dev/null
    for _ in $(seq 20); do
        [[ -z $(squeue --noheader --states=RUNNING,COMPLETING,PENDING 2>/dev/null) ]] && break
        sleep 0.5
    done
fi
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    # Up to 10 s to exit cleanly (slurmd ends its job steps first), then for good.
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
done
# A job step whose slurmd is gone waits for it for good: end this cluster's leftover steps (its
# slurmstepd processes carry SLURM_CONF=DIR/slurm.conf) and what runs under them.
descendants() { local c; for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done; }
for pid in $(pgrep -x slurmstepd); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$dir/slurm.conf" || continue
    kill -9 $(descendants "$pid") "$pid" 2>/dev/null
done
exit 0
