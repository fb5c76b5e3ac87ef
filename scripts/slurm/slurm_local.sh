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
PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, runuser

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

free_port() {  # a TCP port nobody listens on, and the one after it
  python3 - <<'EOF'
import socket
for port in range(16817, 30000, 2):
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("", port)); b.bind(("", port + 1))
        print(port); break
    except OSError:
        continue
EOF
}

# kill_pidfile FILE NAME: stop the process whose PID FILE holds, if it is still NAME (never a reused PID)
kill_pidfile() {
  local file=$1 name=$2 pid i
  [ -s "$file" ] || return 0
  pid=$(tr -dc 0-9 <"$file")
  [ -n "$pid" ] || return 0
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ -e "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  [ -f "$dir/slurm.conf" ] || { echo "$0: $dir holds no cluster (no slurm.conf)" >&2; exit 2; }
  export SLURM_CONF="$dir/slurm.conf"
  if [ -s "$dir/run/slurmctld.pid" ]; then  # end the jobs first, so that no slurmstepd outlives slurmd
    scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(squeue -h -t R,CG,CF,S -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  kill_pidfile "$dir/run/slurmd.pid" slurmd
  kill_pidfile "$dir/run/slurmctld.pid" slurmctld
  kill_pidfile "$dir/munge/munged.pid" munged
}

up() {
  for exe in munged slurmctld slurmd sbatch sinfo; do
    command -v "$exe" >/dev/null || { echo "$0: $exe not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 2; }
  done
  [ "$(id -u)" = 0 ] || { echo "$0: needs root (slurmd starts jobs as their user)" >&2; exit 2; }
  id munge >/dev/null 2>&1 || { echo "$0: no munge user (install the munge package)" >&2; exit 2; }
  [ ! -e "$dir/slurm.conf" ] || { echo "$0: $dir already holds a cluster; '$0 down $dir' first" >&2; exit 2; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  chmod 755 "$dir"  # the munge user must reach $dir/munge
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
  chown munge: "$dir/munge"
  chmod 755 "$dir/munge"  # munged: "execute permissions for all required" on the socket's directory
  # munge: a key of this cluster's own, made by the munge user
  runuser -u munge -- sh -c "umask 077; head -c 1024 /dev/urandom > '$dir/munge/munge.key'"
  local port cpus
  port=${SLURM_LOCAL_PORT:-$(free_port)}
  cpus=${SLURM_LOCAL_CPUS:-8}
  cat >"$dir/slurm.conf" <<EOF
# written by scripts/slurm/slurm_local.sh: a one-node cluster for tests
ClusterName=lbsgd-local
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
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
