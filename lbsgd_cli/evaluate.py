"""``lbsgd eval``: top-1/top-5 error, loss and image count of a checkpoint on its val set.

The network and the data set are those of the checkpoint's stored training config
(:func:`lbsgd_cli.restore.model_from_checkpoint`, with the user's ``data.root`` /
``data.cache_dir`` / ``data.num_workers``), so the
numbers reproduce the training run's last ``val/err`` exactly. Under torchrun the val
set is split into contiguous shares, one per rank, and the sums are all-reduced: the
same numbers as one process.

``eval.bn_recompute=N`` replaces the BN running averages by the plain average of the
batch statistics of ``N`` training minibatches (``k*n`` images, BN over each worker's
``n`` as in training, §2.3, train-mode forward without gradients). The paper notes
(seminar, "Training and validation curves") that running averages are updated less
often with a large minibatch and are therefore noisy early in training.

``offload.mode`` runs the network with its weights in CPU memory (see
:mod:`lbsgd_cli.offload`); ``eval.precision=bf16|fp16`` holds and runs its conv and linear
weights in half precision (:func:`cast_for_eval`). On a CUDA device eval.json records the
peak device memory of the whole evaluation (``peak_allocated_mb``, ``peak_reserved_mb``),
the seminar's memory table per offload mode and precision (results/gpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed as D
from .choices import EvalPrecision
from .data import TrainLoader, load_data
from .engine import evaluate
from .errors import UserError
from .ghost_bn import deferred_running_stats, flush_running_stats
from .metrics import peak_memory_mb, reset_peak_memory
from .offload import place, remove
from .parallel import Parallel
from .restore import check_classes, model_from_checkpoint
from .validation import check_data_root


# --------------------------------------------------------------------------- precision and BN statistics


HALF = {EvalPrecision.bf16: torch.bfloat16, EvalPrecision.fp16: torch.float16}


def cast_for_eval(model: nn.Module, precision: EvalPrecision | str) -> nn.Module:
    """``eval.precision``: every parameter and floating buffer outside BN in bf16/fp16, BN in fp32.

    BN keeps fp32 parameters and statistics (half-precision input, fp32 affine and running
    averages, as under training's autocast), so ``eval.bn_recompute`` accumulates in fp32. The
    network's input is cast to the half dtype and its logits back to fp32 by hooks on the root
    module, so the loss and top-k are computed in fp32 and the callers are unchanged. fp32 returns
    the model as it is. Cast before :func:`lbsgd_cli.offload.place`: the offload hooks then hold,
    and copy, the half-precision weights.
    """
    precision = EvalPrecision(precision)
    if precision == EvalPrecision.fp32:
        return model
    dtype = HALF[precision]
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)

    def to_half(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].to(dtype), *args[1:]) if args and torch.is_tensor(args[0]) else args

    def to_float(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.float()

    model.register_forward_pre_hook(to_half)
    model.register_forward_hook(to_float)
    return model


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, data, cfg: DictConfig, dist: D.Dist, batches: int, chunk: int) -> int:
    """Set every BN's running mean/var to the average over ``batches`` training minibatches.

    Each minibatch is the training's ``k*n`` (this process's workers under torchrun), run
    through the network in train mode ``chunk`` images at a time, BN over groups of ``n``;
    the per-group statistics are summed (over processes too) and averaged once, so the
    result does not depend on the number of processes or on ``chunk``. Returns the images seen.
    """
    k, n, W = cfg.batch.k, cfg.batch.n, dist.world_size
    if k % W:
        raise UserError(f"eval.bn_recompute: the checkpoint's {k} workers cannot be split over {W} processes")
    if k * n > data.train_size:
        raise UserError(f"eval.bn_recompute: k*n = {k * n} is larger than the training set ({data.train_size})")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the single flushed update has weight 1/1
    loader = TrainLoader(data, k, n, dist.rank, W, seed=cfg.seed, device=dist.device)
    chunk = max(n, chunk // n * n)
    model.train()
    seen, epoch = 0, 0
    with deferred_running_stats(model) as layers:
        while seen < batches * k * n // W:
            for x, _ in loader.epoch(epoch):
                for s in range(0, x.shape[0], chunk):
                    model(x[s : s + chunk])
                seen += x.shape[0]
                if seen >= batches * k * n // W:
                    break
            epoch += 1
    flush_running_stats(layers, reduce=Parallel(dist).reduce_buffers)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return seen * W


# --------------------------------------------------------------------------- the command


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``lbsgd eval checkpoint=PATH``: print and write ``eval.json`` (``eval-1.json``, ... if taken)."""
    dist = D.init_distributed(cfg.device)
    run_dir = Path(D.broadcast_object(str(run_dir)))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    reset_peak_memory(dist.device)  # the peak of this evaluation: from before the weights reach the device
    model, tcfg = model_from_checkpoint(cfg.checkpoint, "cpu")
    info = model.checkpoint_info
    for key in ("root", "cache_dir", "num_workers"):
        if cfg.data[key] is not None:
            tcfg.data[key] = cfg.data[key]
    check_data_root(tcfg.data.name, tcfg.data.root)  # data.root=... for a digits checkpoint: refused, not ignored
    data = load_data(tcfg.data).to(dist.device)
    check_classes(model, data.num_classes, tcfg)

    placed = place(cast_for_eval(model, cfg.eval.precision), cfg.offload.mode, dist.device)
    recomputed = 0
    batch = cfg.eval.batch or tcfg.batch.eval_batch
    if cfg.eval.bn_recompute:
        recomputed = recompute_bn_stats(placed.model, data, tcfg, dist, cfg.eval.bn_recompute, batch)
    parallel = Parallel(dist)  # the val set split over ranks; no wrapping: evaluation needs no gradient sync
    result = evaluate(placed.model, parallel.val_batches(data, batch), parallel.reduce_sums)
    placed.release()
    if cfg.offload.mode == "sequential":
        remove(placed.model)
    peak = peak_memory_mb(dist.device)  # empty off CUDA: null in eval.json

    record = {
        **result,
        "checkpoint": info["path"],
        "iteration": info["iteration"],
        "epoch": info["epoch"],
        "offload_mode": cfg.offload.mode,
        "precision": str(cfg.eval.precision),
        "peak_allocated_mb": peak.get("allocated"),
        "peak_reserved_mb": peak.get("reserved"),
        "bn_recompute": cfg.eval.bn_recompute,
        "bn_recompute_images": recomputed,
        "arch": tcfg.model.arch,
        "data": tcfg.data.name if tcfg.data.name == "digits" else str(tcfg.data.root),
        "world_size": dist.world_size,
        "device": str(dist.device),
        "train_last_val": info["last_val"],
    }
    if dist.is_main:
        out = _free_name(run_dir)
        out.write_text(json.dumps(record, indent=2) + "\n")
        _print(record, tcfg, out)
    D.barrier()
    return record


def _free_name(run_dir: Path) -> Path:
    """``eval.json``, or ``eval-1.json``, ``eval-2.json``, ... when taken: nothing is overwritten."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out, i = run_dir / "eval.json", 0
    while out.exists():
        i += 1
        out = run_dir / f"eval-{i}.json"
    return out


def _print(r: dict[str, Any], tcfg: DictConfig, out: Path) -> None:
    bn = f", BN statistics recomputed on {r['bn_recompute_images']} training images" if r["bn_recompute"] else ""
    lines = [
        f"lbsgd eval: {r['arch']} at iteration {r['iteration']} (epoch {r['epoch']}) from {r['checkpoint']}",
        f"  {r['data']} val, {r['world_size']} process(es) on {r['device']}, offload {r['offload_mode']}, "
        f"{r['precision']} weights{bn}",
        f"top-1 error {r['top1_err'] * 100:.2f}%  top-5 error {r['top5_err'] * 100:.2f}%  "
        f"loss {r['loss']:.4f}  images {r['images']}",
    ]
    if r["peak_allocated_mb"] is not None:
        lines.append(f"  peak device memory {r['peak_allocated_mb']:.0f} MiB allocated, "
                     f"{r['peak_reserved_mb']:.0f} MiB reserved (this process)")
    last = r["train_last_val"]
    if last.get("top1_err") is not None:
        lines.append(f"  (training's last val: top-1 error {last['top1_err'] * 100:.2f}%, loss {last['loss']:.4f})")
    lines.append(f"wrote {out}")
    print("\n".join(lines), flush=True)
