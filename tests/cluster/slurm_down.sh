#!/bin/bash
# Stop the cluster started by slurm_up.sh D: cancel jobs, scontrol shutdown, then every daemon by its PID file.
set -u
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 64; }
D=$(realpath "$1")
export SLURM_CONF="$D/slurm.conf"

wait_pid() {  # wait_pid PID SECONDS: wait for exit, then SIGKILL.
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then kill -9 "$pid" 2>/dev/null; sleep 0.2; return; fi
        sleep 0.2
    done
}

if [ -f "$D/ctld.bgpid" ] && kill -0 "$(cat "$D/ctld.bgpid")" 2>/dev/null; then
    scancel -u "$(id -un)" 2>/dev/null
    deadline=$((SECONDS + 15))
    while [ -n "$(squeue -h 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    scontrol shutdown 2>/dev/null
fi
for f in ctld.bgpid slurmd.bgpid slurmctld.pid slurmd.pid; do
    [ -f "$D/$f" ] && wait_pid "$(cat "$D/$f")" 15
done
if [ -f "$D/munged.pid" ]; then
    pid=$(cat "$D/munged.pid")
    kill "$pid" 2>/dev/null
    wait_pid "$pid" 10
fi
rm -f "$D/ctld.bgpid" "$D/slurmd.bgpid" "$D/munged.pid"
echo "slurm_down: stopped"
