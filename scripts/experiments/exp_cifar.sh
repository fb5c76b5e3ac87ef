#!/usr/bin/env bash
# The paper's experiments on CIFAR-10 (results/README.md), one run at a time in priority order:
# the kn ladder (Figures 1, 3), the warmup rows (Table 1, Figures 2, 4), second seeds, the rate rules
# and half / twice the base rate (Table 2a), zero-gamma off at the large kn and the baseline (Table 2b),
# the study again with zero-gamma off (the ladder, Table 1, second seeds), and an fp32 pair to show
# bf16 does not move the result.
# Every run resumes where it stopped and a finished run does nothing: run it again after an
# interruption. A diverged run is reported and the next one starts.
#
#   DATA=/path/to/cifar10 scripts/experiments/exp_cifar.sh [PART...] [-- overrides...]
#
#   PART   ladder | table1 | seeds | rules | nozg | fp32 | shortcut | deep | probe (default: ladder ... fp32)
#          shortcut: Table 2b with projection shortcuts (model.shortcut=B, issue 36): zero-gamma on and off at
#          kn 128 and the large kn, SEEDS (default "0 1"); with DEPTH=20, kn 128 on seed 0
#          deep: the recipe on ResNet-20 (model.depth=20): kn 128 and the large kn, zero-gamma on and off, seed 0
#          deep-gpu: the ladder, table1 and deep, and a second baseline seed (12 runs with DEPTH=20 TABLE1_K=32:
#          scripts/gpu/gpu_session.sh's part deep, issue 28 item 5); a run two of them share starts once (once)
#   DATA   CIFAR-10 in the ImageFolder layout (../shared/data/cifar10-jpeg.tar.gz unpacked), read as
#          data=imagefolder (the presets' data=cifar10 reads torchvision's batches; the results/ runs, made
#          when data=cifar10 meant this tree, keep their directory names and config.yaml as written)
#   RUNS   where the run directories go (default runs/results/cifar, runs/results/cifar90 with SCALE=cpu_90;
#          the probe: $RUNS/../probe)
#   SCALE  cpu (conf/scale/cpu.yaml: ResNet-8, 45 epochs, bf16) | cpu_90 (the same at the paper's 90 epochs)
#          | full (the presets: ResNet-20, 160 epochs)
#   LARGE_K  workers of the large kn (n = 32) of Tables 2a/2b and the fp32 pair: 32 -> kn 1024, the edge
#            of the flat region at 45 epochs
#   TABLE1_K workers of each kn of Table 1 (default "32 64": kn 1024, where warmup hardly matters, and
#            2048, the first rate at which no warmup suffers; results/README.md, the probe)
#   JOBS   runs at once (default 1). On a GPU, ResNet-8 leaves most of the device idle, so several runs
#          share it (results/README.md: 10 on an H200); each run's output then goes to $RUNS/logs/NAME.log
#   THREADS  CPU threads of each run (default 1: one core per run, so JOBS runs, or two scripts, side by side
#            do not wait on each other's OpenMP threads; an override threads=N wins)
# Then: lbsgd plot "$RUNS" --out results
set -uo pipefail
DATA=${DATA:?set DATA to the CIFAR-10 folder holding train/ and val/}
SCALE=${SCALE:-cpu}
if [[ $SCALE == cpu_90 ]]; then RUNS=${RUNS:-runs/results/cifar90}; else RUNS=${RUNS:-runs/results/cifar}; fi
LARGE_K=${LARGE_K:-32}
read -ra TABLE1_K <<< "${TABLE1_K:-32 64}"
LBSGD=${LBSGD:-lbsgd}
JOBS=${JOBS:-1}
parts=() extra=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
  parts+=("$1"); shift
done
((${#parts[@]})) || parts=(ladder table1 seeds rules nozg fp32)
read -ra SEEDS <<< "${SEEDS:-0 1}"
DEPTH=${DEPTH:-8}
scale_arg=(scale="$SCALE"); [[ $SCALE == full ]] && scale_arg=()
[[ $DEPTH == 8 ]] || scale_arg+=(model.depth="$DEPTH")

source "$(dirname "$0")/exp_run.sh"  # run NAME OVERRIDES...
# once NAME OVERRIDES...: run, unless this script started NAME already (deep-gpu's parts share kn128-s0 and the
# large kn's run: with JOBS > 1 a second start would write to the same directory at once)
declare -A started=()
once() { [[ -z ${started[$RUNS/$1]:-} ]] || { echo "=== $1: started already" >&2; return 0; }; started[$RUNS/$1]=1; run "$@"; }
base() { once "kn128-s$1" experiment=cifar_baseline batch.k=4 seed="$1" "${@:2}"; }              # lr 0.1
large() { once "kn$((32 * $1))-$2-s$3" experiment="cifar_large_$2" batch.k="$1" seed="$3" "${@:4}"; }
ladder() { base 0; for k in 32 64 128 256 16 8; do large "$k" gradual 0; done; }   # kn 1024, 2048, ... 256
table1() { for k in "${TABLE1_K[@]}"; do large "$k" none 0; large "$k" constant 0; done; }
deep() {  # RUNS=runs/results/cifar-r20-cpu DEPTH=20: the ResNet-20 runs of results/runs/cifar-r20-cpu
  local z=model.zero_init_residual=false L=$((32 * LARGE_K))
  once kn128-s0 experiment=cifar_baseline batch.k=4 seed=0
  once kn128-nozg-s0 experiment=cifar_baseline batch.k=4 seed=0 $z
  once "kn$L-gradual-s0" experiment=cifar_large_gradual batch.k="$LARGE_K" seed=0
  once "kn$L-gradual-nozg-s0" experiment=cifar_large_gradual batch.k="$LARGE_K" seed=0 $z
}

for part in "${parts[@]}"; do
  case $part in
    ladder) ladder ;;
    table1) table1 ;;
    seeds)  base 1; for k in "${TABLE1_K[@]}"; do for w in gradual none constant; do large "$k" "$w" 1; done; done ;;
    rules)  for r in sqrt none; do run "kn$((32 * LARGE_K))-gradual-$r-s0" experiment=cifar_large_gradual \
              batch.k="$LARGE_K" optim.lr_rule="$r" seed=0; done
            run "kn$((32 * LARGE_K))-gradual-nozg-s0" experiment=cifar_large_gradual batch.k="$LARGE_K" \
              model.zero_init_residual=false seed=0
            run kn128-nozg-s0 experiment=cifar_baseline batch.k=4 model.zero_init_residual=false seed=0  # 2b's baseline
            for lr in 0.05 0.2; do  # the paper's eta = 0.05 k and 0.2 k: half and twice the linear rate
              run "kn$((32 * LARGE_K))-gradual-lr$lr-s0" experiment=cifar_large_gradual batch.k="$LARGE_K" \
                optim.base_lr="$lr" seed=0
            done ;;
    nozg)   # Table 2b's lead as a study of its own: gamma = 1 (model.zero_init_residual=false) for the
            # second seeds of the baseline and the large kn, the ladder to kn 8192, Table 1 (2 seeds) at the large kn,
            # and second seeds of the ladder around it (2048, 512, 256)
            z=model.zero_init_residual=false L=$((32 * LARGE_K))
            run "kn$L-gradual-nozg-s1" experiment=cifar_large_gradual batch.k="$LARGE_K" seed=1 $z
            run kn128-nozg-s1 experiment=cifar_baseline batch.k=4 seed=1 $z
            for k in 16 64; do run "kn$((32 * k))-gradual-nozg-s0" experiment=cifar_large_gradual batch.k=$k seed=0 $z; done
            for w in none constant; do run "kn$L-$w-nozg-s0" experiment=cifar_large_$w batch.k="$LARGE_K" seed=0 $z; done
            for k in 128 8 256; do run "kn$((32 * k))-gradual-nozg-s0" experiment=cifar_large_gradual batch.k=$k seed=0 $z; done
            for w in none constant; do run "kn$L-$w-nozg-s1" experiment=cifar_large_$w batch.k="$LARGE_K" seed=1 $z; done
            for k in 64 16 8; do run "kn$((32 * k))-gradual-nozg-s1" experiment=cifar_large_gradual batch.k=$k seed=1 $z; done ;;
    fp32)   # names of their own: the bf16 runs of the same seeds are in the same folder
            run kn128-fp32-s0 experiment=cifar_baseline batch.k=4 seed=0 precision=fp32
            run "kn$((32 * LARGE_K))-gradual-fp32-s0" experiment=cifar_large_gradual batch.k="$LARGE_K" seed=0 \
              precision=fp32 ;;
    shortcut) # zero-gamma on / off with projection shortcuts: is option A's zero-padding Table 2b's cause here?
            z=model.zero_init_residual=false b=model.shortcut=B L=$((32 * LARGE_K))
            for seed in "${SEEDS[@]}"; do
              run "kn128-sB-s$seed" experiment=cifar_baseline batch.k=4 seed="$seed" $b
              run "kn128-sB-nozg-s$seed" experiment=cifar_baseline batch.k=4 seed="$seed" $b $z
              [[ $DEPTH == 8 ]] || continue
              run "kn$L-gradual-sB-s$seed" experiment=cifar_large_gradual batch.k="$LARGE_K" seed="$seed" $b
              run "kn$L-gradual-sB-nozg-s$seed" experiment=cifar_large_gradual batch.k="$LARGE_K" seed="$seed" $b $z
            done ;;
    deep)   deep ;;
    deep-gpu) ladder; table1; deep; base 1 ;;
    probe)  # the first 5 epochs of the regime at rates 0.8, 1.6, 3.2 (kn 1024, 2048, 4096), no vs gradual warmup
            for k in 4 32 64 128; do for w in none gradual; do
              [[ $k == 4 && $w == gradual ]] && continue                        # kn 128: warmup is flat
              RUNS="$RUNS/../probe" run "resnet8-kn$((32 * k))-$w" experiment=cifar_large_$w batch.k=$k \
                schedule.epochs=5 'schedule.milestones=[100]' seed=0
            done; done ;;
    *) echo "unknown part $part (ladder, table1, seeds, rules, nozg, fp32, shortcut, deep, deep-gpu, probe)" >&2; exit 2 ;;
  esac
done
wait  # JOBS > 1: the last runs
