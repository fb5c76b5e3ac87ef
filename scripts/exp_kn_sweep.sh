#!/usr/bin/env bash
# Figures 1 and 3: val error against kn, gradual warmup, linear rule (§5.3). The baseline and the
# large kn come from the warmup experiment; this adds the rest of the power-of-two ladder.
#   DATA=/path/to/cifar10 scripts/exp_kn_sweep.sh [overrides...]
source "$(dirname "$0")/exp_env.sh"
"${LBSGD[@]}" hydra.sweep.dir="$RUNS/kn_sweep" experiment=cifar_kn_sweep batch.k=$LADDER seed=0 "$@"
