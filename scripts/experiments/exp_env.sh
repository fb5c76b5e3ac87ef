# Shared settings of scripts/experiments/exp_beyond_starved.sh (the paper's experiments are scripts/experiments/exp_cifar.sh).
#   DATA   CIFAR-10 in the ImageFolder layout (../shared/data/cifar10-jpeg.tar.gz unpacked), read as data=imagefolder
#          (which names the sweeps' run directories: results/starved_5k/beyond.md's runs predate it and keep their names)
#   RUNS   where the run directories go: $RUNS/<experiment>/<overrides>/
#   SCALE  cpu: ResNet-8 on a 5k subset, 16 epochs (conf/scale/cpu_5k.yaml, the regime of results/starved_5k/beyond.md), kn 64 vs 256
#          full: the presets as they are: ResNet-20, all 50k images, 160 epochs, kn 128 vs 2048
# Any further arguments are passed to lbsgd as overrides (e.g. threads=2).
set -euo pipefail
DATA=${DATA:?set DATA to the CIFAR-10 folder holding train/ and val/}
RUNS=${RUNS:-runs/results}
SCALE=${SCALE:-cpu}
case "$SCALE" in
  cpu)  BASE_K=2; LARGE_K=8; SCALE_ARG=(scale=cpu_5k) ;;  # the 5k-subset regime of starved_5k/beyond.md
  full) BASE_K=4; LARGE_K=64; SCALE_ARG=() ;;  # n=32: kn 128 / 2048
  *) echo "SCALE must be cpu or full" >&2; exit 2 ;;
esac
LBSGD=(lbsgd train -m data=imagefolder data.root="$DATA" "${SCALE_ARG[@]}")
