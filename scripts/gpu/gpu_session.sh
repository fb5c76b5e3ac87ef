#!/usr/bin/env bash
# Issue 28's work on a lent GPU, as one prepared command per device call (the device tool's `run`).
#
# Here, once per session, before the first call (downloads; both folders are git-ignored):
#   bash scripts/gpu/gpu_session.sh prepare
#     .whl/  the wheels the device's image lacks, for its Python 3.12: hydra-core, omegaconf, antlr4, simplejpeg
#     .gpu/  the CIFAR-10 JPEG tree's archive (../shared/data/cifar10-jpeg.tar.gz, 20 MB)
# On the device (run: carry [".whl", ".gpu"], timeout_s 590):
#   bash scripts/gpu/gpu_session.sh device [PART...]
#     PART (default: correctness bench baselines; each in the order given):
#     correctness  pytest tests/test_cuda.py (resume, no host sync, passes, peak memory), what it measured in
#                  cuda_report.jsonl (item 3)
#     bench        scripts/bench/bench_gpu.py: ResNet-50 step, loader and end to end (item 1, about 5 minutes)
#     memory       scripts/bench/bench_memory.py: peak memory of lbsgd train (memory.checkpointing off/on, fp32/bf16)
#                  and lbsgd eval (offload.mode x eval.precision), ResNet-50 at 256 (item 2, about 5 minutes)
#     baselines    resumes results/inprogress/cifar-h200/* (3 runs at once on the GPU, device=cuda); their
#                  run directories are packed into $OUT/baselines.tar.gz every 20 s and the runs stopped
#                  (SIGTERM: a checkpoint) 35 s before DEADLINE, so a call cut short still brings back their
#                  last checkpoints: unpack into results/inprogress/ and run again (item 4)
#     deep         the paper's recipe (zero-gamma on) on CIFAR ResNet-20, 45 epochs, 12 runs at once (item 5):
#                  scripts/experiments/exp_cifar.sh deep-gpu: baseline kn 128 (seeds 0, 1), the ladder 256-8192,
#                  Table 1 (none, constant) and Table 2b (zero-gamma off) at kn 1024 and the baseline; resumes results/inprogress/cifar-r20/*, packs its run
#                  directories into $OUT/deep-{1,2}.tar.gz every 15 s and stops the runs (SIGTERM: a checkpoint)
#                  35 s before DEADLINE; unpack into results/inprogress/cifar-r20/ and run again
# Each part starts only while DEADLINE (default: 570 s after the start) leaves it its expected time.
# A rehearsal on this CPU at tiny size (no GPU; the same steps, small):
#   OUT=/tmp/out REHEARSE=1 PY=.venv/bin/python bash scripts/gpu/gpu_session.sh device correctness bench memory baselines deep
# What comes back ($OUT, at most 8 files): device.txt, cuda_report.jsonl, bench_gpu.{json,md}, bench_memory.json,
# baselines.tar.gz, deep-{1,2}.tar.gz (each under 16 MiB); the rest is in the call's output.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}  # the device's python3 holds torch; here a venv's, for the rehearsal

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
  mkdir -p .whl .gpu
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 simplejpeg || exit 1
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1  # omegaconf's; no wheel on PyPI
  cp ../shared/data/cifar10-jpeg.tar.gz .gpu/ || exit 1
  ls -la .whl .gpu
}

left() { echo $((DEADLINE - $(date +%s))); }

part_correctness() {  # the tests' figures, then pytest's verdict, into cuda_report.jsonl
  LBSGD_CUDA_REPORT=$OUT/cuda_report.jsonl $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 |
    tee /tmp/cuda_pytest.log
  local rc=${PIPESTATUS[0]}
  $PY -c 'import json, sys; print(json.dumps({"test": "pytest", "rc": int(sys.argv[1]), "summary": sys.argv[2]}))' \
    "$rc" "$(grep -E '[0-9]+ (passed|failed|error)' /tmp/cuda_pytest.log | tail -n 1)" >> "$OUT/cuda_report.jsonl"
  return "$rc"
}

part_bench() {
  local args=()
  [[ -n ${REHEARSE:-} ]] && args=(--smoke)
  $PY scripts/bench/bench_gpu.py "${args[@]}" --out "$OUT/bench_gpu"
}

part_memory() {
  local args=()
  [[ -n ${REHEARSE:-} ]] && args=(--smoke)
  $PY scripts/bench/bench_memory.py "${args[@]}" --out /tmp/bench_memory --work /tmp/bench_memory  # the table: in the output
  cp /tmp/bench_memory/bench_memory.json "$OUT/"
}

cifar_tree() {  # the CIFAR-10 JPEG tree in memory-backed storage, unpacked once per machine
  [[ -d /dev/shm/lbsgd_cifar10/train ]] || { mkdir -p /dev/shm/lbsgd_cifar10 &&
    tar xzf .gpu/cifar10-jpeg.tar.gz -C /dev/shm/lbsgd_cifar10; }
}

pack() {  # pack DIR NAME [ENTRY...]: DIR's run directories (or ENTRYs; no tensorboard) into $OUT/NAME.tar.gz, atomically
  local dir=$1 name=$2; shift 2
  (($#)) || set -- .
  tar czf "$OUT/$name.tar.gz.tmp" --exclude=tb --exclude='*.tmp' -C "$dir" "$@" && mv "$OUT/$name.tar.gz.tmp" "$OUT/$name.tar.gz"
}

stop_runs() {  # stop_runs DIR: SIGTERM to every lbsgd run under DIR (each writes a checkpoint and exits 3), then wait
  pkill -TERM -f "hydra.run.dir=$1/"
  while pgrep -f "hydra.run.dir=$1/" > /dev/null; do sleep 1; done
}

pack_halves() {  # pack_halves DIR NAME: two archives, NAME-1 and NAME-2 (a file comes back only under 16 MiB)
  local entries=() half
  mapfile -t entries < <(ls "$1")
  half=$(((${#entries[@]} + 1) / 2))
  pack "$1" "$2-1" "${entries[@]:0:half}" && pack "$1" "$2-2" "${entries[@]:half}"
}

part_deep() {
  local runs=$ROOT/runs/results/cifar-r20 device=cuda jobs=12 stop=()
  [[ -n ${REHEARSE:-} ]] && device=cpu jobs=2 stop=(checkpoint.stop_after_epoch=1 data.train_subset=9000 data.val_subset=500)
  cifar_tree || return 1
  mkdir -p "$runs"
  [[ -d results/inprogress/cifar-r20 ]] && cp -rn results/inprogress/cifar-r20/. "$runs/"
  # the runs are exp_cifar.sh's part deep-gpu (ResNet-20: the ladder, Table 1 at kn 1024, Table 2b, a second seed)
  DATA=/dev/shm/lbsgd_cifar10 RUNS=$runs LBSGD="$PY -m lbsgd_cli" JOBS=$jobs SCALE=cpu DEPTH=20 LARGE_K=32 TABLE1_K=32 \
    bash scripts/experiments/exp_cifar.sh deep-gpu -- \
    device=$device threads=1 log.progress=plain log.tensorboard=false "${stop[@]}" &
  local study=$!
  while kill -0 "$study" 2>/dev/null; do
    if (($(left) < 35)); then  # before the call's end: no further starts, and the runs stop with a checkpoint
      kill -TERM "$study"
      stop_runs "$runs"
      break
    fi
    pack_halves "$runs" deep; sleep 15
  done
  wait "$study" 2>/dev/null
  pack_halves "$runs" deep
  for d in "$runs"/*/; do
    echo "$(basename "$d"): $(tail -n 1 "$d/metrics.jsonl" 2>/dev/null | cut -c1-120)"
  done
}

part_baselines() {
  local data=/dev/shm/lbsgd_cifar10 runs=$ROOT/runs/results/cifar-h200 device=cuda stop=()
  [[ -n ${REHEARSE:-} ]] && device=cpu stop=(checkpoint.stop_after_epoch=28)  # one epoch each on the CPU
  mkdir -p "$runs"
  cifar_tree || return 1
  local pids=() names=()
  for src in results/inprogress/cifar-h200/*/; do
    local name seed exp zg
    name=$(basename "$src")
    [[ -d $runs/$name ]] || cp -r "$src" "$runs/$name"
    seed=${name##*-s}
    zg=(); [[ $name == *nozg* ]] && zg=(model.zero_init_residual=false)
    $PY -m lbsgd_cli train data=imagefolder data.root="$data" scale=cpu experiment=cifar_baseline batch.k=4 \
      seed="$seed" "${zg[@]}" device=$device threads=2 log.progress=plain log.tensorboard=false "${stop[@]}" \
      hydra.run.dir="$runs/$name" > "$runs/$name/train.log" 2>&1 &
    pids+=($!) names+=("$name")
  done
  while kill -0 "${pids[@]}" 2>/dev/null; do  # any still running: pack what is there now
    (($(left) < 35)) && { stop_runs "$runs"; break; }  # before the call's end: a checkpoint, then the last pack
    pack "$runs" baselines
    sleep 20
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "${names[$i]}: exit $?"; tail -n 2 "$runs/${names[$i]}/train.log"; done
  pack "$runs" baselines
}

case ${1:-} in
  prepare) prepare ;;
  device)
    shift
    OUT=${OUT:?the device tool sets OUT}
    DEADLINE=${DEADLINE:-$(($(date +%s) + 570))}
    if [[ -z ${REHEARSE:-} ]] && ls .whl/*.whl > /dev/null 2>&1; then  # the wheels are the device's (Python 3.12)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
      export PYTHONPATH=/tmp/site:$ROOT
    fi
    export PYTHONUNBUFFERED=1
    [[ -n ${REHEARSE:-} ]] && export LBSGD_TEST_DEVICE=cpu
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/device.txt"
    (($#)) || set -- correctness bench baselines
    declare -A need=([correctness]=120 [bench]=330 [memory]=300 [baselines]=60 [deep]=120)
    for part in "$@"; do
      [[ -n ${need[$part]:-} ]] || { echo "unknown part $part (correctness, bench, memory, baselines, deep)" >&2; exit 2; }
      if (($(left) < need[$part])); then echo "=== $part: skipped, $(left) s left"; continue; fi
      echo "=== $part: start, $(left) s left"
      "part_$part"
      echo "=== $part: exit $?, $(left) s left"
    done ;;
  *) echo "usage: $0 prepare | device [correctness] [bench] [memory] [baselines] [deep]" >&2; exit 2 ;;
esac
