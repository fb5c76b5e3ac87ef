#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` test tier and for trying the SLURM path by hand.
#
#   scripts/slurm/slurm_local.sh up DIR      # config, state and logs under DIR; prints `export SLURM_CONF=DIR/slurm.conf`
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch / srun / squeue / scontrol talk to this cluster
#   scripts/slurm/slurm_local.sh down DIR    # cancels its jobs, stops the daemons it started (by their PID files)
#
# Needs Debian's `slurmctld slurmd slurm-client munge` (it installs nothing) and root: slurmd runs jobs as
# their submitter. No systemd: munged runs as the munge user, then slurmctld, then `slurmd -N localhost`.
# Settings (environment): SLURM_LOCAL_CPUS (CPUs the node declares, default 8: slurmd takes it as given,
# SlurmdParameters=config_overrides), SLURM_LOCAL_PORT (slurmctld's port; slurmd's is the next one; default:
# two free ports). AuthInfo=cred_expire=10 lets a requeued job start again ~13 s after it ends on an idle
# machine (20-40 s on a loaded one; 120 s by default).
set -euo pipefail
# shellcheck source=scripts/slurm/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

down() {
  [ -f "$dir/slurm.conf" ] || { echo "$0: $dir holds no cluster (no slurm.conf)" >&2; exit 2; }
  export SLURM_CONF="$dir/slurm.conf"
  end_jobs
  kill_pidfile "$dir/run/slurmd.pid" slurmd
  kill_pidfile "$dir/run/slurmctld.pid" slurmctld
  kill_pidfile "$dir/munge/munged.pid" munged
}

up() {
  check_prerequisites
  make_cluster_dir
  local port cpus
  port=${SLURM_LOCAL_PORT:-$(free_ports 2)}
  cpus=${SLURM_LOCAL_CPUS:-8}
  {
    echo "# written by scripts/slurm/slurm_local.sh: a one-node cluster for tests"
    echo "ClusterName=lbsgd-local"
    echo "SlurmctldHost=localhost"
    echo "SlurmctldPort=$port"
    echo "SlurmdPort=$((port + 1))"
    common_conf
    echo "SlurmdPidFile=$dir/run/slurmd.pid"
    echo "SlurmdLogFile=$dir/log/slurmd.log"
    echo "NodeName=localhost NodeHostname=localhost CPUs=$cpus State=UNKNOWN"
    echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
  } >"$dir/slurm.conf"
  export SLURM_CONF="$dir/slurm.conf"
  start_munged
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N localhost
  local state=""
  for _ in $(seq 150); do  # idle within ~2 s
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    echo "$0: the node is not idle after 30 s (state '${state}'); logs in $dir/log and $dir/munge" >&2
    tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null || true
    down
    exit 1
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

case $action in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
