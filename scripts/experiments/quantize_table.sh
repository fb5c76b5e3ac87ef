#!/usr/bin/env bash
# The quantization results of results/quantization.md for one trained checkpoint:
#   1. weight-only: bits 8,6,4,3,2 x per-tensor/per-channel x min-max/MSE/percentile (30 rows);
#   2. 8-bit weights and activations (calibrated on 8 training batches) for the same 6 range settings,
#      plus real int8 kernels (torchao pt2e + inductor): their val error and latency vs fp32 at batch 32.
# Usage: scripts/experiments/quantize_table.sh CHECKPOINT [DATA_ROOT] [OUT_DIR]
#   CHECKPOINT  a checkpoint of lbsgd train (e.g. runs/train/<run>/checkpoints/last.pt)
#   DATA_ROOT   where its data set is now, if it moved (default: the path recorded in the checkpoint)
#   OUT_DIR     default runs/quantize_table/<checkpoint's run name>; must not exist yet
# VAL_SUBSET=N in the environment evaluates on a stratified subset of N val images (default: all).
set -euo pipefail
ckpt=${1:?usage: scripts/experiments/quantize_table.sh CHECKPOINT [DATA_ROOT] [OUT_DIR]}
root=${2:-}
out=${3:-runs/quantize_table/$(basename "$(dirname "$(dirname "$ckpt")")")}
extra=()
[[ -n "$root" ]] && extra+=("data_root=$root")
[[ -n "${VAL_SUBSET:-}" ]] && extra+=("val_subset=$VAL_SUBSET")
start=$(date +%s)
lbsgd quantize checkpoint="$ckpt" "${extra[@]}" hydra.run.dir="$out/weights" \
  'quant.bits=[8,6,4,3,2]' 'quant.granularity=[per_tensor,per_channel]' 'quant.method=[minmax,mse,percentile]'
lbsgd quantize checkpoint="$ckpt" "${extra[@]}" hydra.run.dir="$out/weights_activations" \
  quant.bits=8 quant.activations=true 'quant.granularity=[per_tensor,per_channel]' \
  'quant.method=[minmax,mse,percentile]' quant.calib_batches=8 quant.int8_backend=true quant.latency_batch=32
echo "tables: $out/weights/quantize_table.md $out/weights_activations/quantize_table.md"
echo "wall time: $(( $(date +%s) - start )) s"
