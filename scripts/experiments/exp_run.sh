# Shared by scripts/experiments/exp_cifar.sh and scripts/experiments/exp_beyond.sh: `run NAME OVERRIDES...` trains one run in
# $RUNS/NAME with `$LBSGD train data=imagefolder data.root=$DATA ${scale_arg[@]} OVERRIDES ${extra[@]}` (the
# JPEG tree; data=cifar10 is torchvision's batches); JOBS > 1 runs up to JOBS at once, each logging to
# $RUNS/logs/NAME.log. A run that fails is reported and the next one starts. Each run gets threads=$THREADS
# (default 1: one core per run) unless its overrides name threads: torch's default is every core, and two runs
# that each take every core wait on each other's OpenMP threads. Pass THREADS=2 (or threads=2) for a run that has the machine to itself.
THREADS=${THREADS:-1}
run() {
  local name=$1; shift
  local threads=(threads="$THREADS")
  [[ " $* ${extra[*]} " == *" threads="* ]] && threads=()
  local cmd=($LBSGD train data=imagefolder data.root="$DATA" "${scale_arg[@]}" "${threads[@]}" "$@" hydra.run.dir="$RUNS/$name" "${extra[@]}")
  echo "=== $name: $*" >&2
  if ((JOBS > 1)); then
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
    mkdir -p "$RUNS/logs"
    { "${cmd[@]}" >"$RUNS/logs/$name.log" 2>&1 || echo "=== $name exited with status $?" >&2; } &
  else
    "${cmd[@]}" || echo "=== $name exited with status $?" >&2
  fi
}
