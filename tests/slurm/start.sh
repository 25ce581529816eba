#!/usr/bin/env bash
# A one-node SLURM cluster for the tests: munged, slurmctld and slurmd as root, everything
# (config, keys, state, logs, sockets) in one folder, nothing under /etc or /var touched.
#
#   tests/slurm/start.sh DIR     # then: export SLURM_CONF=DIR/slurm.conf; sbatch/srun/squeue work
#   tests/slurm/stop.sh DIR
#
# Needs root (slurmd runs jobs as their owner) and Debian's slurm-wlm + munge packages.
# Exit 0: the partition `debug` is up and idle. Exit 3: cannot run here (not root, no packages);
# exit 1: a daemon did not come up (the reason and the log folder on stderr).
# Ports: DILEXP_SLURM_PORT (slurmctld) and the next one (slurmd), default 26817, away from a
# real installation's 6817/6818.
set -euo pipefail

dir=${1:?usage: start.sh DIR}
port=${DILEXP_SLURM_PORT:-26817}

cannot() { echo "slurm: cannot run here: $*" >&2; exit 3; }
failed() { echo "slurm: did not start: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || cannot "not root (slurmd and munged need it)"
for bin in munged slurmctld slurmd sbatch sinfo scontrol; do
    command -v "$bin" >/dev/null || cannot "no $bin (apt-get install slurm-wlm munge)"
done

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# munged refuses group/world-writable folders on the way to its socket and key.
chmod 0700 "$dir"
mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 0700 "$dir/munge"

# Our own key: the package's belongs to the munge user, and munged runs as root here.
key="$dir/munge/munge.key"
[[ -f $key ]] || { head -c 1024 /dev/urandom > "$key"; chmod 0400 "$key"; }
sock="$dir/munge/munge.sock"
munged --force --socket="$sock" --key-file="$key" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || failed "munged did not start ($(tail -n 2 "$dir/log/munged.log" 2>/dev/null))"

# The node as slurmd sees it (CPUs, memory): a node configured above what it has is drained.
host=$(hostname -s)
node=$(slurmd -C | head -n 1)
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
[[ -n $cpus && -n $mem ]] || failed "slurmd -C said: $node"

cat > "$dir/slurm.conf" <<CONF
# Written by tests/slurm/start.sh: one node, no accounting, no cgroups, no GPUs.
ClusterName=dilexp-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job (preemption, time limit) may start again after 5 s, not 120.
AuthInfo=socket=$sock,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Pending jobs (a requeued one) are looked at every 2 s, not every 60.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
# -c: a fresh cluster, no jobs from an earlier start.
slurmctld -c -f "$SLURM_CONF" || failed "slurmctld did not start ($(tail -n 3 "$dir/log/slurmctld.log" 2>/dev/null))"
slurmd -f "$SLURM_CONF" -N "$host" || failed "slurmd did not start ($(tail -n 3 "$dir/log/slurmd.log" 2>/dev/null))"

for _ in $(seq 60); do
    state=$(sinfo -h -p debug -o %T 2>/dev/null || true)
    [[ $state == idle ]] && { echo "slurm: partition debug idle ($cpus CPUs, $mem MB) in $dir" >&2; exit 0; }
    sleep 0.5
done
failed "partition debug is '${state:-unknown}' after 30 s; logs in $dir/log"
