#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for tests and for trying the sbatch templates by hand.
#
#   slurm/local_cluster.sh start [--install]   # network, munged, slurmctld, two slurmd; wait for both nodes
#   slurm/local_cluster.sh stop                 # stop the daemons and jobs, remove the network
#   slurm/local_cluster.sh status
#
# The nodes are two network namespaces, cgpt-n1 (10.213.0.1) and cgpt-n2 (10.213.0.2), each with its
# own hostname (a UTS namespace) and one slurmd. Their veths meet on a bridge in the root namespace
# (10.213.0.254), where slurmctld runs, so traffic between the nodes (srun, gloo) crosses the veths
# and never uses loopback. /etc/netns/<node>/hosts (bind-mounted over /etc/hosts for the node's daemons) resolves the
# node names inside the nodes; nothing in the machine's own /etc/hosts changes.
#
# Clients find the cluster through SLURM_CONF=$CGPT_SLURM_DIR/slurm.conf (printed by `start`; also
# linked to /etc/slurm/slurm.conf when that file does not exist). State, spool and logs live under
# CGPT_SLURM_DIR (default /tmp/cgpt-slurm). Needs root (namespaces, slurmd) and Debian's packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (`start --install` runs that when slurmctld is missing). Fails when the namespaces cannot be made.
set -euo pipefail

DIR="${CGPT_SLURM_DIR:-/tmp/cgpt-slurm}"
CONF="$DIR/slurm.conf"
CTL="$(hostname -s)"
NET=10.213.0
CTL_ADDR="$NET.254"
BRIDGE=cgpt-br
NODES=(cgpt-n1 cgpt-n2)
IFACE=cgpt0 # the node's interface inside its namespace (GLOO_SOCKET_IFNAME for jobs that need it)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local mem_mb
    # Half of this machine's memory per node; 6 CPUs per node (config_overrides: more than a 2-core
    # machine has), so the SLURM tests' jobs (two 2-task jobs and a 2-node one) run side by side.
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.45)}' /proc/meminfo)"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a two-node test cluster (network namespaces cgpt-n1, cgpt-n2).
ClusterName=cgpt-local
SlurmctldHost=$CTL($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
# A node that was DOWN for not responding comes back when its slurmd registers again; one set DOWN
# by hand (scontrol, as the node-loss test does) stays DOWN until 'scontrol update nodename=N state=resume'.
ReturnToService=1
# A job on a node that fails is requeued when it allows it (sbatch --requeue, as the template does).
JobRequeue=1
# Fast turnaround for tests: short waits between SIGTERM and SIGKILL and for lost nodes.
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
EOF
    local i
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeAddr=$NET.$((i + 1)) NodeHostname=${NODES[$i]} CPUs=6 RealMemory=$mem_mb State=UNKNOWN"
    done >>"$CONF"
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    if [[ ! -e /etc/slurm/slurm.conf && -w /etc/slurm ]]; then
        ln -s "$CONF" /etc/slurm/slurm.conf
    fi
}

start_network() {
    local i node addr
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (needs root and CAP_NET_ADMIN)"
        ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for i in "${!NODES[@]}"; do
        node="${NODES[$i]}"
        addr="$NET.$((i + 1))"
        mkdir -p "/etc/netns/$node"
        {
            echo "127.0.0.1 localhost"
            echo "$CTL_ADDR $CTL"
            for j in "${!NODES[@]}"; do echo "$NET.$((j + 1)) ${NODES[$j]}"; done
        } >"/etc/netns/$node/hosts"
        ip netns list | grep -qw "^$node" && continue
        ip netns add "$node" || die "cannot create network namespace $node (ip netns add needs root)"
        ip link add "v-$node" type veth peer name "$IFACE" netns "$node"
        ip link set "v-$node" master "$BRIDGE" up
        ip -n "$node" addr add "$addr/24" dev "$IFACE"
        ip -n "$node" link set "$IFACE" up
        ip -n "$node" link set lo up
    done
}

check_links() {
    # Each node reaches the other's slurmd by name, over the bridge (what srun and gloo need).
    local a b
    for a in "${NODES[@]}"; do
        for b in "${NODES[@]}"; do
            [[ "$a" == "$b" ]] && continue
            ip netns exec "$a" timeout 5 bash -c "exec 3<>/dev/tcp/$b/${CGPT_SLURMD_PORT:-6818}" ||
                die "node $a cannot reach $b:${CGPT_SLURMD_PORT:-6818} over $BRIDGE (a firewall on bridged traffic?)"
        done
    done
}

start_munge() {
    if pgrep -u munge -x munged >/dev/null; then return; fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
}

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    [[ "${1:-}" == "--install" ]] && ! command -v slurmctld >/dev/null && install_packages
    command -v slurmctld >/dev/null || die "slurmctld not installed (run with --install, or see the header)"
    [[ "$(id -u)" == 0 ]] || die "must run as root (namespaces and slurmd need it)"
    local tool
    for tool in ip nsenter unshare; do
        command -v "$tool" >/dev/null || die "$tool not found (install iproute2 and util-linux)"
    done
    write_conf
    export SLURM_CONF="$CONF"
    start_network
    start_munge
    running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$node"
        # The node's network, its own hostname (UTS namespace) and hosts file (mount namespace), so
        # slurmd, srun and gloo on it see the node's name and address. (Not `ip netns exec`: it
        # remounts /sys without the cgroup filesystem slurmd needs.)
        running "$DIR/slurmd-$node.pid" ||
            nsenter --net="/run/netns/$node" unshare --mount --uts sh -c \
                "mount --bind /etc/netns/$node/hosts /etc/hosts && hostname $node && exec slurmd -f '$CONF' -N $node"
    done
    # Nodes left DOWN by hand (a node-loss test that did not finish) come back.
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    for _ in $(seq 60); do
        if [[ "$(sinfo -h -N -o "%T" 2>/dev/null | grep -cE "^(idle|mixed|allocated)")" == "${#NODES[@]}" ]]; then
            check_links
            echo "local SLURM cluster up: nodes ${NODES[*]} ($NET.1-2, controller $CTL_ADDR); export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log >&2 || true
    die "nodes ${NODES[*]} did not become idle within 30 s (logs above)"
}

stop() {
    local node pids
    for node in "${NODES[@]}"; do
        if [[ -f "$DIR/slurmd-$node.pid" ]]; then
            kill "$(cat "$DIR/slurmd-$node.pid")" 2>/dev/null || true
            rm -f "$DIR/slurmd-$node.pid"
        fi
    done
    if [[ -f "$DIR/slurmd.pid" ]]; then # the one slurmd of a cluster started by an older version of this script
        kill "$(cat "$DIR/slurmd.pid")" 2>/dev/null || true
        rm -f "$DIR/slurmd.pid"
    fi
    if [[ -f "$DIR/slurmctld.pid" ]]; then
        kill "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || true
        rm -f "$DIR/slurmctld.pid"
    fi
    for node in "${NODES[@]}"; do
        if ip netns list | grep -qw "^$node"; then
            # Job processes still in the node (slurmstepd and its tasks outlive slurmd).
            pids="$(ip netns pids "$node")"
            [[ -n "$pids" ]] && kill $pids 2>/dev/null || true
            ip netns del "$node"
        fi
        rm -rf "/etc/netns/$node"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    echo "local SLURM cluster stopped, namespaces and bridge removed (munged left running)"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo -N -l ;;
    *) die "usage: $0 start [--install] | stop | status" ;;
esac
