#!/usr/bin/env bash
# Table 2a: square-root scaling and no scaling of the rate at the large kn (the linear rule is the
# warmup experiment's gradual run).
#   DATA=/path/to/cifar10 scripts/exp_lr_rule.sh [overrides...]
source "$(dirname "$0")/exp_env.sh"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/lr_rule" experiment=cifar_large_gradual batch.k=$LARGE_K \
  optim.lr_rule=sqrt,none seed=0 "$@"
