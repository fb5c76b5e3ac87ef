# Shared by scripts/slurm/slurm_local.sh (one node) and slurm_cluster.sh (nodes in network namespaces): sourced,
# not run. The prerequisites, the cluster's folder and munge key, munged, the slurm.conf lines both clusters
# share, free ports, ending the jobs and stopping a daemon by its PID file.
PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, runuser

# check_prerequisites EXE...: Debian's SLURM and munge (and EXE...), root, the munge user; one line and exit 2 if not
check_prerequisites() {
  local exe
  for exe in munged slurmctld slurmd sbatch sinfo "$@"; do
    command -v "$exe" >/dev/null || { echo "$0: $exe not found (apt-get install slurmctld slurmd slurm-client munge iproute2)" >&2; exit 2; }
  done
  [ "$(id -u)" = 0 ] || { echo "$0: needs root (slurmd starts jobs as their user)" >&2; exit 2; }
  id munge >/dev/null 2>&1 || { echo "$0: no munge user (install the munge package)" >&2; exit 2; }
}

# make_cluster_dir: $dir (made absolute) with state/, spool/, log/, run/ and munge/ holding a key of this cluster's own
make_cluster_dir() {
  [ ! -e "$dir/slurm.conf" ] || { echo "$0: $dir already holds a cluster; '$0 down $dir' first" >&2; exit 2; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  chmod 755 "$dir"  # the munge user must reach $dir/munge
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
  chown munge: "$dir/munge"
  chmod 755 "$dir/munge"  # munged: "execute permissions for all required" on the socket's directory
  runuser -u munge -- sh -c "umask 077; head -c 1024 /dev/urandom > '$dir/munge/munge.key'"
}

# start_munged: munged as the munge user, its socket a path under $dir (every network namespace reaches it)
start_munged() {
  runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

# common_conf: the slurm.conf lines both clusters share (authentication, state, plugins, timeouts)
common_conf() {
  cat <<CONF
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
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
CONF
}

# free_ports COUNT: the first of COUNT consecutive TCP ports nobody listens on here, searched from a random
# start (clusters started at once, by pytest -n, look in different places)
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
count = int(sys.argv[1])
for port in range(random.randrange(16817, 29000), 30000):
    socks = [socket.socket() for _ in range(count)]
    try:
        for i, s in enumerate(socks):
            s.bind(("", port + i))
        print(port); break
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
PY
}

# end_jobs: cancel this user's jobs and wait for them to end, so that no slurmstepd outlives its slurmd
end_jobs() {
  [ -s "$dir/run/slurmctld.pid" ] || return 0
  scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(squeue -h -t R,CG,CF,S -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
}

# kill_pidfile FILE NAME: stop the process whose PID FILE holds, if it is still NAME (never a reused PID)
kill_pidfile() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(tr -dc 0-9 <"$file")
  [ -n "$pid" ] || return 0
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ -e "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}
