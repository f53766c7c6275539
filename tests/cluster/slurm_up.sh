#!/bin/bash
# Start a single-node Slurm on localhost with its state in folder D (shared/reference/slurm.md recipe).
# Usage: tests/cluster/slurm_up.sh D    then: export SLURM_CONF=D/slurm.conf    stop: tests/cluster/slurm_down.sh D
# Installs slurmctld slurmd slurm-client munge with apt-get when missing (root only). Exit 3: cannot run here.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 64; }
mkdir -p "$1"
D=$(realpath "$1")
mkdir -p "$D/state" "$D/spool" "$D/log"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm_up: Slurm is not installed and cannot be installed (needs root and apt-get)" >&2; exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
        >"$D/log/apt.log" 2>&1 || { echo "slurm_up: apt-get install failed (see $D/log/apt.log)" >&2; exit 3; }
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm_up: the local cluster runs its daemons as root (SlurmUser=root); run as root" >&2; exit 3
fi

# Node line from slurmd -C (without its NodeName), RealMemory = MemTotal - 1 GiB.
HW=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat >"$D/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
MinJobAge=600
JobFileAppend=1
NodeName=localhost ${HW}RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/slurm.conf"

install -d -o munge -g munge -m 755 /run/munge
if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    echo "slurm_up: using the munged already running (not ours: slurm_down.sh leaves it)"
else
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 40); do [ -s /run/munge/munged.pid ] && break; sleep 0.25; done
    cp /run/munge/munged.pid "$D/munged.pid"
fi

setsid slurmctld -D -f "$SLURM_CONF" </dev/null >"$D/log/slurmctld.out" 2>&1 & echo $! >"$D/ctld.bgpid"
setsid slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >"$D/log/slurmd.out" 2>&1 & echo $! >"$D/slurmd.bgpid"

deadline=$((SECONDS + 30))
until [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; do
    if [ $SECONDS -ge $deadline ]; then
        echo "slurm_up: node not idle after 30 s; logs in $D/log:" >&2
        tail -n 5 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2 || true
        exit 4
    fi
    sleep 0.25
done
echo "slurm_up: ready (SLURM_CONF=$SLURM_CONF)"
