#!/usr/bin/env bash
# Table 1 / Figure 2: the baseline kn against a large kn with no, constant and gradual warmup (§2.2, §5.2).
#   DATA=/path/to/cifar10 scripts/exp_warmup.sh [overrides...]
source "$(dirname "$0")/exp_env.sh"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/warmup" experiment=cifar_baseline batch.k=$BASE_K seed=$SEEDS "$@"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/warmup" experiment=cifar_large_none,cifar_large_constant,cifar_large_gradual \
  batch.k=$LARGE_K seed=$SEEDS "$@"
