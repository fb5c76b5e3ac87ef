#!/usr/bin/env bash
# Table 2b: zero-gamma off at the large kn (on is the warmup experiment's gradual run) (§5.1).
#   DATA=/path/to/cifar10 scripts/exp_zero_gamma.sh [overrides...]
source "$(dirname "$0")/exp_env.sh"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/zero_gamma" experiment=cifar_large_gradual batch.k=$LARGE_K \
  model.zero_init_residual=false seed=0 "$@"
