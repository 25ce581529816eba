#!/usr/bin/env bash
# Stop what tests/slurm/start.sh DIR started (by the pid files in DIR); DIR itself stays.
set -uo pipefail

dir=${1:?usage: stop.sh DIR}
for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    # Up to 10 s to exit cleanly (slurmd ends its job steps first), then for good.
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
done
exit 0
