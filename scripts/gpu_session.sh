#!/usr/bin/env bash
# Issue 28's work on a lent GPU, as one prepared command per device call (the device tool's `run`).
#
# Here, once per session, before the first call (downloads; both folders are git-ignored):
#   bash scripts/gpu_session.sh prepare
#     .whl/  the wheels the device's image lacks, for its Python 3.12: hydra-core, omegaconf, antlr4, simplejpeg
#     .gpu/  the CIFAR-10 JPEG tree's archive (../shared/data/cifar10-jpeg.tar.gz, 20 MB)
# On the device (run: carry [".whl", ".gpu"], timeout_s 590):
#   bash scripts/gpu_session.sh device [PART...]      PART: correctness bench baselines (default: all three)
#     correctness  pytest tests/test_cuda.py (resume, no host sync, passes), what it measured in cuda_report.jsonl
#     bench        scripts/bench_gpu.py: ResNet-50 step, loader and end to end (about 5 minutes)
#     baselines    resumes results/inprogress/cifar-h200/* (3 runs at once on the GPU, device=cuda); their
#                  run directories are packed into $OUT/baselines.tar.gz every 20 s, so a call cut short
#                  still brings back their last checkpoints: unpack into results/inprogress/ and run again
# Each part starts only while DEADLINE (default: 570 s after the start) leaves it its expected time.
# A rehearsal on this CPU at tiny size (no GPU; the same steps, small):
#   OUT=/tmp/out REHEARSE=1 PY=.venv/bin/python bash scripts/gpu_session.sh device correctness bench baselines
# What comes back ($OUT, at most 8 files): device.txt, cuda_report.jsonl, bench_gpu.{json,md}, baselines.tar.gz;
# the rest is in the call's output.
set -uo pipefail
cd "$(dirname "$0")/.."
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

part_correctness() {
  LBSGD_CUDA_REPORT=$OUT/cuda_report.jsonl $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
}

part_bench() {
  local args=()
  [[ -n ${REHEARSE:-} ]] && args=(--smoke)
  $PY scripts/bench_gpu.py "${args[@]}" --out "$OUT/bench_gpu"
}

part_baselines() {
  local data=/dev/shm/lbsgd_cifar10 runs=$ROOT/runs/results/cifar-h200 device=cuda stop=()
  [[ -n ${REHEARSE:-} ]] && device=cpu stop=(checkpoint.stop_after_epoch=28)  # one epoch each on the CPU
  mkdir -p "$data" "$runs"
  [[ -d $data/train ]] || tar xzf .gpu/cifar10-jpeg.tar.gz -C "$data" || return 1
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
    tar czf "$OUT/baselines.tar.gz.tmp" -C "$runs" . && mv "$OUT/baselines.tar.gz.tmp" "$OUT/baselines.tar.gz"
    sleep 20
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "${names[$i]}: exit $?"; tail -n 2 "$runs/${names[$i]}/train.log"; done
  tar czf "$OUT/baselines.tar.gz" -C "$runs" .
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
    declare -A need=([correctness]=90 [bench]=330 [baselines]=60)
    for part in "$@"; do
      [[ -n ${need[$part]:-} ]] || { echo "unknown part $part (correctness, bench, baselines)" >&2; exit 2; }
      if (($(left) < need[$part])); then echo "=== $part: skipped, $(left) s left"; continue; fi
      echo "=== $part: start, $(left) s left"
      "part_$part"
      echo "=== $part: exit $?, $(left) s left"
    done ;;
  *) echo "usage: $0 prepare | device [correctness] [bench] [baselines]" >&2; exit 2 ;;
esac
