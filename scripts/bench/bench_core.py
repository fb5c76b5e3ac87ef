#!/usr/bin/env python
"""Benchmark of the core training step, ghost BN and the loaders, as ratios taken in one run.

    python scripts/bench/bench_core.py [--data-root /path/to/cifar10] [--rounds 5] [--iters 8]

1. lbsgd's training step (``engine.train_step``: lr set, ghost-BN bookkeeping, loss
   normalised by kn) over a plain hand-written PyTorch loop, same model and batch
   (one worker of n = batch, so BN is the same computation).          goal >= 0.97
2. ghost BN with n=32 (batch/32 workers in one pass) over plain BN on the same batch.
                                                                       goal >= 0.90
3. the in-memory loader's images/s (CIFAR-10 when --data-root is given, else
   synthetic 32x32) over the images/s the training step consumes.     goal >= 2
4. the streaming loader (ImageNet-sized JPEGs, the paper's augmentation, DataLoader
   workers) over ResNet-50's training consumption on this device.      goal >= 2

Measurements alternate A, B, then B, A (the order reversed every round) for ``--rounds`` rounds, each
side after one untimed step, and report medians, so a noisy shared machine hurts both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig, ModelConfig, OptimConfig
from lbsgd_cli.data import TrainLoader, load_data
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer, set_lr
from lbsgd_cli.engine import StepPlan, train_step
from timing import alternate_rounds, time_per_call


def model_cfg(arch: str, depth: int = 20):
    return OmegaConf.structured(ModelConfig(arch=arch, depth=depth))


def timed(fn, iters: int) -> float:
    """Seconds per call over ``iters`` calls, after one untimed call."""
    fn()  # warm-up
    return time_per_call(fn, iters)


def plain_loop_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def make_lbsgd_step(arch, depth, batch, n, x, y, device):
    torch.manual_seed(0)
    model = build_model(model_cfg(arch, depth), 10, x.shape[1], bn_group=n).to(device).train()
    opt = build_optimizer(model, OmegaConf.structured(OptimConfig()), 0.1)
    k = batch // n
    plan = StepPlan(per_process=k, per_pass=k, n=n, loss_scale=1.0 / batch)

    def step():
        set_lr(opt, 0.1)
        train_step(model, opt, (x, y), plan)

    return step


def make_plain_step(arch, depth, x, y, device):
    torch.manual_seed(0)
    model = build_model(model_cfg(arch, depth), 10, x.shape[1], bn_group=None).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return lambda: plain_loop_step(model, opt, x, y)


def alternate(a, b, rounds: int, iters: int) -> tuple[float, float]:
    """Median seconds per call of ``a`` and of ``b`` over alternating rounds."""
    t = alternate_rounds({"a": a, "b": b}, rounds, iters=iters, warmup_each_round=True)
    return statistics.median(t["a"]), statistics.median(t["b"])


def loader_rate(loader: TrainLoader, batches: int) -> float:
    it = loader.epoch(0)
    next(it)  # start-up (workers, first batch) excluded
    t = time.perf_counter()
    seen = 0
    for _ in range(batches):
        x, _ = next(it)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t)


def make_jpeg_tree(root: Path, count: int, size: int = 375) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count // 2 if split == "train" else 2):
                img = torch.randint(0, 255, (size, int(size * 1.33), 3), generator=g, dtype=torch.uint8)
                Image.fromarray(img.numpy()).save(d / f"{i}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="CIFAR-10 ImageFolder root for the in-memory loader")
    ap.add_argument("--arch", default="cifar_resnet")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--skip-streaming", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"model {args.arch}-{args.depth}, batch {args.batch}, rounds {args.rounds} x {args.iters} iters")

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    # 1. engine overhead: same model, same batch, one BN group
    t_plain, t_lbsgd = alternate(make_plain_step(args.arch, args.depth, x, y, device),
                                 make_lbsgd_step(args.arch, args.depth, args.batch, args.batch, x, y, device),
                                 args.rounds, args.iters)
    r1 = t_plain / t_lbsgd
    print(f"[1] step throughput  plain loop {args.batch / t_plain:8.1f} img/s   lbsgd {args.batch / t_lbsgd:8.1f} "
          f"img/s   lbsgd/plain = {r1:.3f}  (goal >= 0.97)")

    # 2. ghost BN n=32 vs plain BN on the same batch
    t_bn, t_ghost = alternate(make_lbsgd_step(args.arch, args.depth, args.batch, args.batch, x, y, device),
                              make_lbsgd_step(args.arch, args.depth, args.batch, args.n, x, y, device),
                              args.rounds, args.iters)
    r2 = t_bn / t_ghost
    print(f"[2] ghost BN n={args.n} ({args.batch // args.n} groups) {args.batch / t_ghost:8.1f} img/s   plain BN "
          f"{args.batch / t_bn:8.1f} img/s   ghost/plain = {r2:.3f}  (goal >= 0.90)")

    # 3. in-memory loader vs the training consumption measured in [1]
    if args.data_root:
        dcfg = OmegaConf.structured(DataConfig(name="imagefolder", root=args.data_root))
        data = load_data(dcfg)
        source = f"CIFAR-10 at {args.data_root} ({data.train_size} images)"
    else:
        from lbsgd_cli.data import InMemoryData, TensorSplit

        g = torch.Generator().manual_seed(0)
        xs = torch.randint(0, 255, (20000, 3, 32, 32), generator=g, dtype=torch.uint8)
        ys = torch.randint(0, 10, (20000,), generator=g)
        data = InMemoryData(TensorSplit(xs, ys), TensorSplit(xs[:100], ys[:100]), [str(i) for i in range(10)],
                            (0.5,) * 3, (0.25,) * 3, 4, True)
        source = "synthetic 32x32 uint8 (20,000 images)"
    data = data.to(device)
    loader = TrainLoader(data, args.batch // args.n, args.n, device=device)
    rates = [loader_rate(loader, min(50, len(loader) - 1)) for _ in range(args.rounds)]
    r3 = statistics.median(rates) / (args.batch / t_lbsgd)
    print(f"[3] in-memory loader ({source}) {statistics.median(rates):10.0f} img/s   training consumes "
          f"{args.batch / t_lbsgd:8.1f} img/s   loader/training = {r3:.1f}  (goal >= 2)")

    # 4. streaming loader (ImageNet-sized JPEGs) vs ResNet-50 training on this device
    if not args.skip_streaming:
        with tempfile.TemporaryDirectory() as tmp:
            make_jpeg_tree(Path(tmp), 96)
            dcfg = OmegaConf.structured(DataConfig(name="imagefolder", root=tmp, num_workers=2))
            sdata = load_data(dcfg)
            sloader = TrainLoader(sdata, 1, 16, device=device)
            rate = loader_rate(sloader, 4)
            xb = torch.randn(16, 3, 224, 224, device=device)
            yb = torch.randint(0, 2, (16,), device=device)
            step50 = make_lbsgd_step("resnet50", 50, 16, 16, xb, yb, device)
            t50 = timed(step50, 2)
            print(f"[4] streaming loader (375x500 JPEGs, RandomResizedCrop 224, 2 workers) {rate:8.1f} img/s   "
                  f"ResNet-50 training consumes {16 / t50:6.1f} img/s   loader/training = {rate * t50 / 16:.1f}  "
                  f"(goal >= 2)")


if __name__ == "__main__":
    main()
