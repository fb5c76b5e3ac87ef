#!/usr/bin/env python
"""The whole lbsgd step against a bare hand-written loop, in each precision, as paired ratios in one run.

    PYTHONPATH=. python scripts/bench/bench_step.py [--rounds 7] [--iters 3] [--threads 1] [--depth 20] [--per-pass K]

Sides, all CIFAR ResNet-20 (``--depth``) on one batch of 128 (``--batch``) random 32x32 images:

- ``bare``: the loop anyone would write: ``nn.BatchNorm2d`` over the whole batch, ``torch.optim.SGD``
  (momentum 0.9, weight decay 1e-4), autocast around forward and loss, ``zero_grad``/``backward``/``step``;
- ``lbsgd n=128``: what ``lbsgd train`` runs per iteration (``set_lr``, :func:`engine.train_step` with a
  :class:`StepPlan`, the divergence flag and the device-side loss/hit sums of the loop) with one worker of
  128 (BN over the whole batch, as in ``bare``): the engine's own overhead;
- ``lbsgd n=32``: the same with the paper's ghost BN over n = 32 (4 workers in one pass, or ``--per-pass``
  workers per pass): the whole step;
- ``lbsgd n=32 fused``: the same with ``model.bn_kernel=fused`` (one compiled BN kernel per layer for
  the 4 workers; compiled in the untimed warm-up steps).

Every round times ``--iters`` steps of each side, the order of the sides reversing every round; a ratio
is the median over rounds of the ratio within a round (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timing import alternate_rounds, paired_ratio

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.divergence import DivergenceWatch
from lbsgd_cli.engine import StepPlan, autocast, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer, set_lr

VARIANTS = (("fp32", False), ("bf16", False), ("bf16", True))  # (precision, channels_last)


def _model(n: int | None, channels_last: bool, device: torch.device, depth: int,
           bn_kernel: str = "native") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=depth, bn_kernel=bn_kernel))
    model = build_model(cfg, 10, 3, bn_group=n).to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bare_step(precision: str, channels_last: bool, x: torch.Tensor, y: torch.Tensor, depth: int):
    """A hand-written training step: plain BN, torch's SGD, autocast of forward and loss."""
    model = _model(None, channels_last, x.device, depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ctx = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(model(xs), y)
        loss.backward()
        opt.step()

    return step


def lbsgd_step(precision: str, channels_last: bool, n: int, x: torch.Tensor, y: torch.Tensor, depth: int,
               bn_kernel: str = "native", per_pass: int | None = None):
    """What ``lbsgd train`` does per iteration (train.train_one_epoch), without logging and checkpoints."""
    model = _model(n, channels_last, x.device, depth, bn_kernel)
    opt = build_optimizer(model, OmegaConf.structured(OptimConfig()), 0.1)
    k = x.shape[0] // n
    plan = StepPlan(per_process=k, per_pass=per_pass or k, n=n, loss_scale=1.0 / x.shape[0], precision=precision,
                    channels_last=channels_last)
    watch = DivergenceWatch(x.device)
    sums = [torch.zeros((), dtype=torch.float64, device=x.device) for _ in range(2)]
    it = [0]

    def step() -> None:
        set_lr(opt, 0.1)
        res = train_step(model, opt, (x, y), plan)
        watch.update(res.loss, it[0])
        sums[0] += res.loss
        sums[1] += res.hits
        it[0] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (8: the results/ runs)")
    ap.add_argument("--per-pass", type=int, default=None,
                    help="workers per forward pass of the n-sides (default: all in one pass; 1: the results/ runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, ResNet-{args.depth}, batch "
          f"{args.batch}, workers per pass {args.per_pass or 'all'}, {args.rounds} rounds x {args.iters} steps per side")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    whole, ghost = f"lbsgd n={args.batch}", f"lbsgd n={args.n}"
    print(f"| precision | format | bare img/s | {whole} img/s | {ghost} img/s | {ghost} fused img/s "
          f"| {whole} / bare | {ghost} / bare | {ghost} fused / bare |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision, cl in VARIANTS:
        sides = {"bare": bare_step(precision, cl, x, y, args.depth),
                 "whole": lbsgd_step(precision, cl, args.batch, x, y, args.depth),
                 "ghost": lbsgd_step(precision, cl, args.n, x, y, args.depth, per_pass=args.per_pass),
                 "fused": lbsgd_step(precision, cl, args.n, x, y, args.depth, "fused", args.per_pass)}
        # seconds per step of each side in each round; 2 warm-up steps each: allocator, oneDNN primitives
        t = alternate_rounds(sides, args.rounds, iters=args.iters, warmup=2)
        ips = {name: args.batch / statistics.median(v) for name, v in t.items()}
        ratio = {name: paired_ratio(t["bare"], t[name]) for name in ("whole", "ghost", "fused")}
        print(f"| {precision} | {'channels_last' if cl else 'nchw'} | {ips['bare']:.0f} | {ips['whole']:.0f} | "
              f"{ips['ghost']:.0f} | {ips['fused']:.0f} | {ratio['whole']:.3f} | {ratio['ghost']:.3f} | "
              f"{ratio['fused']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
