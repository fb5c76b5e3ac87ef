#!/usr/bin/env bash
# A multi-node SLURM cluster on this machine: N nodes in network namespaces, for the `multinode` test tier,
# the "Across nodes" measurements (results/performance.md) and for trying the many-node path by hand.
#
#   scripts/slurm/slurm_cluster.sh up DIR [--nodes N]   # prints `export SLURM_CONF=DIR/slurm.conf`
#   export SLURM_CONF=DIR/slurm.conf              # then sbatch / srun / squeue / scontrol talk to this cluster
#   scripts/slurm/slurm_cluster.sh shape DIR RATE       # every node's link limited to RATE (tc tbf: 1gbit, 100mbit)
#   scripts/slurm/slurm_cluster.sh shape DIR none       #   ... and unshaped again
#   scripts/slurm/slurm_cluster.sh link DIR NODE down   # cut node NODE's link (its cable pulled); `up` restores it
#   scripts/slurm/slurm_cluster.sh exec DIR NODE CMD... # run CMD on node NODE (its network, hostname, /etc/hosts)
#   scripts/slurm/slurm_cluster.sh kill DIR NODE PATTERN  # SIGKILL the processes on node NODE whose command matches
#   scripts/slurm/slurm_cluster.sh down DIR             # ends the jobs, stops the daemons (by PID), removes the links
#
# The cluster: node1..nodeN, each a network namespace with its own hostname (a UTS namespace) and its own
# /etc/hosts (a mount namespace: the cluster's names, bind-mounted), joined by veth pairs to a bridge; the
# bridge holds the controller's address, and slurmctld runs in a UTS namespace whose hostname is `ctl`.
# One munged (its socket is a path: every namespace reaches it), one slurmctld, one slurmd per node
# (`nsenter --net` + `unshare --uts --mount`: `ip netns exec` remounts /sys and hides the cgroup file system
# slurmd needs). Addresses: a free 10.249.X.0/24, used only inside what this script creates. Per-node spool,
# log and PID files under DIR; DIR/cluster.env records the names that `down` removes.
# Needs root and Debian's `slurmctld slurmd slurm-client munge` (it installs nothing), iproute2 and tc.
# The kernel here has no sch_netem, so links get a rate (tbf) but no added delay: their latency is the
# veth's own (tens of microseconds), measured in results/performance.md.
# Settings (environment): SLURM_CLUSTER_CPUS (CPUs each node declares, default 4).
set -Eeuo pipefail
# shellcheck source=scripts/slurm/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"

usage() {
  echo "usage: $0 up DIR [--nodes N] | down DIR | shape DIR RATE|none | link DIR NODE up|down |" \
    "exec DIR NODE CMD... | kill DIR NODE PATTERN" >&2
  exit 2
}
[ $# -ge 2 ] || usage
action=$1 dir=$2
shift 2

load() {
  [ -f "$dir/cluster.env" ] || { echo "$0: $dir holds no cluster (no cluster.env)" >&2; exit 2; }
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  export SLURM_CONF="$dir/slurm.conf"
}

node_pid() {  # the PID of node $1's slurmd: the holder of its namespaces
  local file="$dir/run/slurmd-node$1.pid" pid
  [ -s "$file" ] || { echo "$0: node$1 has no slurmd (no $file)" >&2; exit 2; }
  pid=$(tr -dc 0-9 <"$file")
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = slurmd ] ||
    { echo "$0: node$1's slurmd (PID $pid) is not running" >&2; exit 2; }
  echo "$pid"
}

check_node() {
  [[ $1 =~ ^[0-9]+$ ]] && ((1 <= $1 && $1 <= NODES)) || { echo "$0: no node $1 (1..$NODES)" >&2; exit 2; }
}

down() {
  load
  end_jobs
  local i ns
  for i in $(seq "$NODES"); do kill_pidfile "$dir/run/slurmd-node$i.pid" slurmd; done
  kill_pidfile "$dir/run/slurmctld.pid" slurmctld
  kill_pidfile "$dir/munge/munged.pid" munged
  for i in $(seq "$NODES"); do  # whatever still runs on a node (a job step left behind) ends with it
    ns="${PREFIX}n$i"
    if ip netns pids "$ns" >/dev/null 2>&1; then
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "${PREFIX}v$i" 2>/dev/null || true
  done
  ip link del "${PREFIX}br" 2>/dev/null || true
  rm -f "$dir/cluster.env"
}

free_subnet() {  # 10.249.X: an X no interface here uses
  local x used
  used=$(ip -o -4 addr show | awk '{print $4}')
  for x in $(shuf -i 1-254); do
    grep -q "^10\.249\.$x\." <<<"$used" || { echo "$x"; return; }
  done
  echo "$0: no free 10.249.X.0/24" >&2
  exit 1
}

up() {
  local nodes=2
  while (($#)); do
    case $1 in
      --nodes) nodes=${2:?}; shift 2 ;;
      --nodes=*) nodes=${1#--nodes=}; shift ;;
      *) usage ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ ]] && ((1 <= nodes && nodes <= 16)) || { echo "$0: --nodes must be 1..16" >&2; exit 2; }
  check_prerequisites ip tc nsenter unshare
  make_cluster_dir

  local id x port cpus i
  id=$(head -c 2 /dev/urandom | od -An -tx1 | tr -d ' \n')
  x=$(free_subnet)
  port=$(free_ports 1)
  cpus=${SLURM_CLUSTER_CPUS:-4}
  PREFIX="lb$id" NODES=$nodes NET="10.249.$x"
  printf 'PREFIX=%s\nNODES=%s\nNET=%s\n' "$PREFIX" "$NODES" "$NET" >"$dir/cluster.env"
  trap 'echo "$0: bringing the cluster up failed; removing what was made" >&2; down' ERR

  # the network: a bridge with the controller's address, one veth pair per node
  ip link add "${PREFIX}br" type bridge
  ip addr add "$NET.1/24" dev "${PREFIX}br"
  ip link set "${PREFIX}br" up
  {
    echo "127.0.0.1 localhost"
    echo "$NET.1 ctl"
    for i in $(seq "$nodes"); do echo "$NET.$((10 + i)) node$i"; done
  } >"$dir/hosts"
  for i in $(seq "$nodes"); do
    ip netns add "${PREFIX}n$i"
    ip link add "${PREFIX}v$i" type veth peer name "${PREFIX}p$i"
    ip link set "${PREFIX}p$i" netns "${PREFIX}n$i"
    ip -n "${PREFIX}n$i" link set "${PREFIX}p$i" name eth0
    ip -n "${PREFIX}n$i" addr add "$NET.$((10 + i))/24" dev eth0
    ip -n "${PREFIX}n$i" link set lo up
    ip -n "${PREFIX}n$i" link set eth0 up
    ip link set "${PREFIX}v$i" master "${PREFIX}br"
    ip link set "${PREFIX}v$i" up
  done

  {
    echo "# written by scripts/slurm/slurm_cluster.sh: a $nodes-node cluster in network namespaces, for tests"
    echo "ClusterName=lbsgd-nodes"
    echo "SlurmctldHost=ctl($NET.1)"
    echo "SlurmctldPort=$port"
    echo "SlurmdPort=6818"
    common_conf
    echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "MessageTimeout=10"
  } >"$dir/slurm.conf"
  for i in $(seq "$nodes"); do
    echo "NodeName=node$i NodeAddr=$NET.$((10 + i)) NodeHostname=node$i CPUs=$cpus State=UNKNOWN" >>"$dir/slurm.conf"
  done
  echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
  export SLURM_CONF="$dir/slurm.conf"

  start_munged
  # slurmctld checks that its host is the SlurmctldHost's name: a UTS namespace named ctl
  unshare --uts --mount sh -c "hostname ctl && mount --bind '$dir/hosts' /etc/hosts && exec slurmctld -f '$SLURM_CONF'"
  for i in $(seq "$nodes"); do
    nsenter --net="/run/netns/${PREFIX}n$i" unshare --uts --mount sh -c \
      "hostname node$i && mount --bind '$dir/hosts' /etc/hosts && exec slurmd -f '$SLURM_CONF' -N node$i"
  done
  local idle=""
  for _ in $(seq 150); do  # all idle within a few seconds
    idle=$(sinfo -h -t idle -o %D 2>/dev/null | head -1 || true)
    [ "$idle" = "$nodes" ] && break
    sleep 0.2
  done
  if [ "$idle" != "$nodes" ]; then
    echo "$0: $((${idle:-0})) of $nodes nodes idle after 30 s; logs in $dir/log and $dir/munge" >&2
    sinfo -N >&2 2>/dev/null || true
    tail -5 "$dir"/log/*.log >&2 2>/dev/null || true
    trap - ERR
    down
    exit 1
  fi
  trap - ERR
  echo "export SLURM_CONF=$SLURM_CONF"
}

shape() {
  load
  local rate=${1:?RATE (1gbit, 100mbit, ...) or none} i
  for i in $(seq "$NODES"); do
    if [ "$rate" = none ]; then
      tc qdisc del dev "${PREFIX}v$i" root 2>/dev/null || true
      tc -n "${PREFIX}n$i" qdisc del dev eth0 root 2>/dev/null || true
    else  # both directions: the bridge's side (to the node) and the node's side (from it)
      tc qdisc replace dev "${PREFIX}v$i" root tbf rate "$rate" burst 256kb latency 100ms
      tc -n "${PREFIX}n$i" qdisc replace dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
    fi
  done
}

case $action in
  up) up "$@" ;;
  down) down ;;
  shape) shape "$@" ;;
  link)
    load; [ $# -eq 2 ] || usage; check_node "$1"
    [[ $2 == up || $2 == down ]] || usage
    ip link set "${PREFIX}v$1" "$2" ;;
  exec)
    load; [ $# -ge 2 ] || usage; check_node "$1"
    pid=$(node_pid "$1"); shift
    exec nsenter --target "$pid" --net --uts --mount -- "$@" ;;
  kill)
    load; [ $# -eq 2 ] || usage; check_node "$1"
    for pid in $(ip netns pids "${PREFIX}n$1"); do
      [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] && continue
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done ;;
  *) usage ;;
esac
