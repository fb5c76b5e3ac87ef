#!/usr/bin/env bash
# The device call: the CIFAR-10 study (scale=cpu regime) on one GPU, JOBS runs at once.
# env: PARTS, JOBS, BUDGET (seconds for the runs), SMOKE_ARGS (extra overrides for a quick CPU rehearsal)
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/device.log") 2>&1
PARTS=${PARTS:-rules nozg ladder table1 seeds fp32}
JOBS=${JOBS:-10}; BUDGET=${BUDGET:-530}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch, hydra, omegaconf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'hydra', hydra.__version__)" || exit 3
mkdir -p /tmp/data/cifar10 && tar -xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data/cifar10 || exit 3
L="python3 -m lbsgd_cli"
echo "=== $(( $(date +%s) - T0 )) s: smoke (CIFAR-10 cache + 1 epoch of kn 1024 on 4096 images)"
$L train data.root=/tmp/data/cifar10 scale=cpu experiment=cifar_large_gradual batch.k=32 schedule.epochs=1 \
   data.train_subset=4096 log.progress=plain hydra.run.dir=/tmp/smoke/cifar ${SMOKE_ARGS:-} || exit 4
left=$(( T0 + BUDGET - $(date +%s) ))
echo "=== $(( $(date +%s) - T0 )) s: the study, JOBS=$JOBS, $left s: $PARTS"
read -ra parts <<< "$PARTS"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > "$OUT/gpu_util.csv" 2>/dev/null &
timeout -k 25 "$left" env JOBS="$JOBS" DATA=/tmp/data/cifar10 SCALE=cpu RUNS=/tmp/runs/cifar-h100 LBSGD="$L" \
  bash scripts/exp_cifar.sh "${parts[@]}" -- threads=2 log.progress=plain ${SMOKE_ARGS:-}
echo "=== $(( $(date +%s) - T0 )) s: study ended ($?)"
nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null
cd /tmp/runs && tar -czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=tb --exclude='*.pt' cifar-h100
cd /tmp/smoke && tar -czf "$OUT/smoke.tar.gz" --exclude=checkpoints --exclude=tb --exclude='*.pt' .
ls -la "$OUT"; echo "=== $(( $(date +%s) - T0 )) s: done"
