#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the sbatch templates by hand.
#
#   slurm/local_cluster.sh start [--install]   # start munged, slurmctld, slurmd; wait for the node
#   slurm/local_cluster.sh stop                 # stop the daemons started by `start`
#   slurm/local_cluster.sh status
#
# Clients find the cluster through SLURM_CONF=$CGPT_SLURM_DIR/slurm.conf (printed by `start`; also
# linked to /etc/slurm/slurm.conf when that file does not exist). State, spool and logs live under
# CGPT_SLURM_DIR (default /tmp/cgpt-slurm). Needs root (slurmd does) and Debian's packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (`start --install` runs that when slurmctld is missing).
set -euo pipefail

DIR="${CGPT_SLURM_DIR:-/tmp/cgpt-slurm}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local cpus mem_mb
    # At least 4 CPUs (config_overrides: more than the machine has), so two 2-task test jobs run side by side.
    cpus="$(nproc)"
    ((cpus < 4)) && cpus=4
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster.
ClusterName=cgpt-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${CGPT_SLURMCTLD_PORT:-6817}
SlurmdPort=${CGPT_SLURMD_PORT:-6818}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
# Fast turnaround for tests: short waits between SIGTERM and SIGKILL, requeue without delay.
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -e /etc/slurm/slurm.conf && -w /etc/slurm ]]; then
        ln -s "$CONF" /etc/slurm/slurm.conf
    fi
}

start_munge() {
    if pgrep -u munge -x munged >/dev/null; then return; fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
}

start() {
    [[ "${1:-}" == "--install" ]] && ! command -v slurmctld >/dev/null && install_packages
    command -v slurmctld >/dev/null || die "slurmctld not installed (run with --install, or see the header)"
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd needs it)"
    write_conf
    export SLURM_CONF="$CONF"
    start_munge
    if ! [[ -f "$DIR/slurmctld.pid" ]] || ! kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        slurmctld -f "$CONF"
    fi
    if ! [[ -f "$DIR/slurmd.pid" ]] || ! kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null; then
        slurmd -f "$CONF"
    fi
    for _ in $(seq 60); do
        if sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^idle"; then
            echo "local SLURM cluster up: node $NODE idle; export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $NODE did not become idle within 30 s (logs above)"
}

stop() {
    local f
    for f in slurmd slurmctld; do
        if [[ -f "$DIR/$f.pid" ]]; then
            kill "$(cat "$DIR/$f.pid")" 2>/dev/null || true
            rm -f "$DIR/$f.pid"
        fi
    done
    echo "local SLURM cluster stopped (munged left running)"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo -N -l ;;
    *) die "usage: $0 start [--install] | stop | status" ;;
esac
