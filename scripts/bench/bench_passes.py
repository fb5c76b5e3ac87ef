#!/usr/bin/env python
"""How many workers per forward pass: the measure behind ``batch.workers_per_pass=auto`` on a CPU.

    python scripts/bench/bench_passes.py [--rounds 3] [--steps 2] [--threads 1]

One process holding k = 32 workers of n = 32 (kn = 1024, the CIFAR ladder's flat-region edge) takes
``engine.train_step`` steps with 1, 2, 4, 8 and 32 workers per pass, for CIFAR ResNet-8 and ResNet-20
in fp32 and bf16. The settings are interleaved round by round (the machine is shared and noisy) and
each is reported as the median images/s and its ratio to one pass of all 32 workers. ``auto`` is the
pass :func:`lbsgd_cli.engine.pass_workers` chooses on this device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, pass_workers, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer

K, N = 32, 32
PASSES = (1, 2, 4, 8, 32)


def step_fn(depth: int, per_pass: int, precision: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=depth)), 10, 3, bn_group=N)
    opt = build_optimizer(model.train(), OmegaConf.structured(OptimConfig()), 0.1)
    plan = StepPlan(per_process=K, per_pass=per_pass, n=N, loss_scale=1 / (K * N), precision=precision)
    return lambda: train_step(model, opt, (x, y), plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 20])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(K * N, 3, 32, 32, generator=g), torch.randint(0, 10, (K * N,), generator=g)
    auto = pass_workers("auto", K, N, torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} thread(s), kn = {K}x{N}; auto chooses {auto} worker(s) per pass\n")
    print("| model | precision | " + " | ".join(f"{p} per pass" for p in PASSES) + " | auto / one pass |")
    print("|---|---|" + "---|" * (len(PASSES) + 1))
    for depth in args.depths:
        for precision in ("fp32", "bf16"):
            fns = {p: step_fn(depth, p, precision, x, y) for p in PASSES}
            for fn in fns.values():
                fn()  # warm-up
            rates: dict[int, list[float]] = {p: [] for p in PASSES}
            for _ in range(args.rounds):
                for p, fn in fns.items():
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        fn()
                    rates[p].append(K * N * args.steps / (time.perf_counter() - t))
            med = {p: statistics.median(v) for p, v in rates.items()}
            cells = " | ".join(f"{med[p]:.0f} ({med[p] / med[32]:.2f}x)" for p in PASSES)
            print(f"| ResNet-{depth} | {precision} | {cells} | {med[auto] / med[32]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
