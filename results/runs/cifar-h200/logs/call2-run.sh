#!/usr/bin/env bash
# Second device call: the baselines the first one did not finish, the same commands as exp_cifar.sh's.
set -u
T0=$(date +%s); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/device2.log") 2>&1
BUDGET=${BUDGET:-215}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/data/cifar10 && tar -xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data/cifar10 || exit 3
R=/tmp/runs/cifar-h200; mkdir -p $R/logs
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > "$OUT/gpu_util2.csv" 2>/dev/null &
go() { local name=$1; shift
  python3 -m lbsgd_cli train data.root=/tmp/data/cifar10 scale=cpu "$@" hydra.run.dir=$R/$name threads=2 log.progress=plain \
    > $R/logs/$name.log 2>&1 & }
echo "=== $(( $(date +%s) - T0 )) s: start"
go kn128-nozg-s0 experiment=cifar_baseline batch.k=4 model.zero_init_residual=false seed=0
go kn128-nozg-s1 experiment=cifar_baseline batch.k=4 seed=1 model.zero_init_residual=false
go kn128-s0 experiment=cifar_baseline batch.k=4 seed=0
go kn1024-gradual-s0 experiment=cifar_large_gradual batch.k=32 seed=0
while (( $(date +%s) < T0 + BUDGET )) && [[ -n $(jobs -rp) ]]; do sleep 2; done
echo "=== $(( $(date +%s) - T0 )) s: $(jobs -rp | wc -l) still running"
kill -TERM $(jobs -rp) 2>/dev/null; sleep 6
cd /tmp/runs && tar -czf "$OUT/runs2.tar.gz" --exclude=tb cifar-h200
ls -la "$OUT"; echo "=== $(( $(date +%s) - T0 )) s: done"
