#!/usr/bin/env bash
# Every results experiment, first seed first, then the figures:
#   DATA=/path/to/cifar10 scripts/exp_all.sh [overrides...]
# Runs resume where they stopped: run it again after an interruption.
set -euo pipefail
here=$(dirname "$0")
SEEDS=0 "$here/exp_warmup.sh" "$@"
"$here/exp_kn_sweep.sh" "$@"
"$here/exp_lr_rule.sh" "$@"
"$here/exp_zero_gamma.sh" "$@"
SEEDS=1 "$here/exp_warmup.sh" "$@"
python "$here/plot_results.py" "${RUNS:-runs/results}" --out results
