#!/usr/bin/env bash
# Beyond the paper (results/beyond.md), in the regime of the paper's CIFAR study (scale=cpu: ResNet-8, all of
# CIFAR-10, 45 epochs, bf16) with gamma = 1 (model.zero_init_residual=false): can the flat region be pushed
# past its break at kn 2048-8192, and does the gradient noise scale of the baseline's first epochs predict it?
# Every run resumes where it stopped and a finished run does nothing: run it again after an interruption.
#
#   DATA=/path/to/cifar10 scripts/experiments/exp_beyond.sh [PART...] [-- overrides...]
#
#   PART  warmup | lars-probe | lars | noise | poly | starved   (default: noise lars-probe warmup)
#     noise       the baseline (kn 128) with log.noise_scale=true, 4 passes of one worker (B_small 32, B_big 128),
#                 in NOISE_RUNS (default $RUNS/../noise: its arithmetic is the baseline's seed 0, bit for bit, so
#                 it stays out of the plots' seeds); then:
#                 python scripts/experiments/recommend_kn.py $NOISE_RUNS/kn128-noise-s0 --before-epoch 5 --by-epoch
#     lars-probe  LARS (eta 0.001, the poly decay of You et al. 2017, power 2, after the 5-epoch gradual warmup)
#                 at kn 4096: the first PROBE_EPOCHS epochs (checkpoint.stop_after_epoch) at peak rates
#                 LARS_PROBE (default "10 5 20"); the chosen rate's run goes on with part lars
#     lars        LARS at peak LARS_PEAK (default 10) at kn LARS_KN (default "4096 8192"), seeds SEEDS
#     warmup      SGD with a longer gradual warmup (WARMUPS epochs, default "10 15"; the paper's is 5) at kn
#                 WARMUP_KN (default "4096 8192"), seeds WARMUP_SEEDS (default 0; then the best length on SEEDS),
#                 with log.noise_scale=true: B_simple through a large-kn run too (B_small = 2 workers, 64)
#     poly        the poly schedule against its own baseline (issue 36): kn 128 with poly decay (power 2) and no
#                 warmup, then the ladder kn POLY_KN (default "1024 2048 8192") with the 15-epoch gradual warmup and
#                 poly decay, for each seed of SEEDS (the ladder's 4096 and 8192 s0 are in results/runs/beyond)
#     starved     the earlier 5k-subset runs of results/starved_5k/beyond.md (scripts/experiments/exp_env.sh)
#   RUNS  where the run directories go (default runs/results/beyond); LBSGD, JOBS, THREADS: as in exp_cifar.sh
#   SEEDS seeds of the runs that carry a claim (default "0 1")
# Then: lbsgd plot runs/results/cifar "$RUNS" --out results (the recipe's ladder beside the methods: fig1_methods.png)
set -uo pipefail
DATA=${DATA:?set DATA to the CIFAR-10 folder holding train/ and val/}
RUNS=${RUNS:-runs/results/beyond}
NOISE_RUNS=${NOISE_RUNS:-$(dirname "$RUNS")/noise}
LBSGD=${LBSGD:-lbsgd}
JOBS=${JOBS:-1}
PROBE_EPOCHS=${PROBE_EPOCHS:-6}
read -ra LARS_PROBE <<< "${LARS_PROBE:-10 5 20}"
LARS_PEAK=${LARS_PEAK:-10}
read -ra LARS_KN <<< "${LARS_KN:-4096 8192}"
read -ra SEEDS <<< "${SEEDS:-0 1}"
read -ra WARMUPS <<< "${WARMUPS:-10 15}"
read -ra WARMUP_KN <<< "${WARMUP_KN:-4096 8192}"
read -ra POLY_KN <<< "${POLY_KN:-1024 2048 8192}"
read -ra WARMUP_SEEDS <<< "${WARMUP_SEEDS:-0}"
parts=() extra=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
  parts+=("$1"); shift
done
((${#parts[@]})) || parts=(noise lars-probe warmup)
scale_arg=(scale=cpu model.zero_init_residual=false)

source "$(dirname "$0")/exp_run.sh"  # run NAME OVERRIDES...
# lars KN PEAK SEED [OVERRIDES...]: the rate is the linear rule's from base_lr = PEAK * 128 / KN (the
# presets' ref_batch 128), so warmup still starts at the reference rate (rules.lr_at)
lars() { run "kn$1-lars-poly-lr$2-s$3" experiment=cifar_large_gradual optim=lars batch.k=$(($1 / 32)) \
  schedule.decay=poly optim.base_lr="$(python3 -c "print($2 * 128 / $1)")" seed="$3" "${@:4}"; }

for part in "${parts[@]}"; do
  case $part in
    noise)      RUNS=$NOISE_RUNS run kn128-noise-s0 experiment=cifar_baseline batch.k=4 seed=0 log.noise_scale=true \
                  batch.workers_per_pass=1 log.every=5 ;;
    lars-probe) for lr in "${LARS_PROBE[@]}"; do lars 4096 "$lr" 0 checkpoint.stop_after_epoch="$PROBE_EPOCHS"; done ;;
    lars)       for seed in "${SEEDS[@]}"; do for kn in "${LARS_KN[@]}"; do lars "$kn" "$LARS_PEAK" "$seed"; done; done ;;
    warmup)     for seed in "${WARMUP_SEEDS[@]}"; do for w in "${WARMUPS[@]}"; do for kn in "${WARMUP_KN[@]}"; do
                  run "kn$kn-gradual-w$w-s$seed" experiment=cifar_large_gradual batch.k=$((kn / 32)) \
                    schedule.warmup_epochs=$w seed="$seed" log.noise_scale=true batch.workers_per_pass=2
                done; done; done ;;
    poly)       for seed in "${SEEDS[@]}"; do
                  run "kn128-poly-s$seed" experiment=cifar_baseline batch.k=4 schedule.decay=poly seed="$seed" \
                    batch.workers_per_pass=1
                done
                for seed in "${SEEDS[@]}"; do for kn in "${POLY_KN[@]}"; do
                  run "kn$kn-gradual-poly-w15-s$seed" experiment=cifar_large_gradual batch.k=$((kn / 32)) \
                    schedule.warmup_epochs=15 schedule.decay=poly seed="$seed"
                done; done ;;
    starved)    bash "$(dirname "$0")/exp_beyond_starved.sh" "${extra[@]}" ;;
    *) echo "unknown part $part (noise, lars-probe, lars, warmup, poly, starved)" >&2; exit 2 ;;
  esac
done
wait  # JOBS > 1: the last runs
