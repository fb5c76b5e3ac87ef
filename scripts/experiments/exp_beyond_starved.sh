#!/usr/bin/env bash
# The earlier beyond-the-paper runs at the step-starved 5k-subset scale (results/starved_5k/beyond.md):
# LARS beside plain SGD past the break-down point, the gradient noise scale of the baseline, and compressed
# allreduce (fp16, PowerSGD) on 2 processes at the large kn.
#   DATA=/path/to/cifar10 scripts/experiments/exp_beyond.sh starved [-- overrides...]
source "$(dirname "$0")/exp_env.sh"
LARS_LR=${LARS_LR:-10}  # conf/optim/lars.yaml's base rate (eta = 0.001); the presets' 0.1 is SGD's
# linear rule from lr 10 at kn 64 diverges at kn 256 (lr 40: a step moves each weight by lr*eta = 4 %
# of its norm, 40 % with momentum); square-root scaling continues the ladder
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/lars" experiment=cifar_kn_sweep optim=lars optim.base_lr=$LARS_LR \
  batch.k=$BASE_K,$LARGE_K seed=0 "$@"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/lars" experiment=cifar_kn_sweep optim=lars optim.base_lr=$LARS_LR \
  optim.lr_rule=sqrt batch.k=$LARGE_K,$((LARGE_K * 2)),$((LARGE_K * 4)) seed=0 "$@"
# B_simple from the per-worker gradients: two passes of one worker each (B_small = n, B_big = kn)
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/noise_scale" experiment=cifar_baseline batch.k=$BASE_K seed=0 \
  log.noise_scale=true batch.workers_per_pass=1 "$@"
python "$(dirname "$0")/recommend_kn.py" "$RUNS/noise_scale/$(ls "$RUNS/noise_scale" | grep -v multirun | head -1)"
# DDP communication hooks need a process group: 2 processes under torchrun, one run per hook
for hook in fp16 powersgd; do
  torchrun --nproc_per_node=2 --master_port=$((29500 + RANDOM % 1000)) -m lbsgd_cli train data=imagefolder \
    data.root="$DATA" "${SCALE_ARG[@]}" experiment=cifar_large_gradual batch.k=$LARGE_K seed=0 dist.comm_hook=$hook \
    hydra.run.dir="$RUNS/comm_hook/$hook" "$@"
done
