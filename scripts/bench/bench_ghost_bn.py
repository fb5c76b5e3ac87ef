"""Training-step speed of ghost BN (issue 13, item 2) and of bf16 against fp32, on the CPU.

ResNet-20 (CIFAR, ``model.arch=cifar_resnet``, depth 20) at batch 128, one training step
(forward, cross-entropy, backward, SGD step) with

- ``plain``: ``nn.BatchNorm2d`` over the whole batch (no ghost BN),
- ``copy-free``: :class:`lbsgd_cli.ghost_bn.GhostBatchNorm2d` with ``model.bn_kernel=native`` (one
  native BN call per worker's slice, a view),
- ``fused``: the same with ``model.bn_kernel=fused`` (one torch.compile-generated kernel per layer for
  all the pass's workers; compiled in the warm-up steps, which are not timed),

at g = 1, 4 and 32 workers per pass, in NCHW and channels_last, fp32 and bf16 autocast: either at a
fixed batch (``--batch 128``: n = 128/g, down to n = 4) or at the paper's fixed per-worker BN size
(``--n 32``: batch g*32, up to 1,024, plain BN over the same batch). Optionally torchvision's
ResNet-50 at 224x224, fp32 against bf16.

The former ghost BN of issue 13 (the batch transposed ``(g*n, C) -> (n, g*C)``) was a side here until
issue 37; its columns in results/performance.md came from commit 6871f08 of this script
(``git show 6871f08:scripts/bench_ghost_bn.py``).

The machine is shared and noisy: one thread, every variant runs one step per round, the
order of the variants reverses every round, and each ratio is the median over rounds of the
ratio within a round. Usage::

    PYTHONPATH=. python scripts/bench/bench_ghost_bn.py [--rounds 9] [--batch 128 | --n 32] [--r50-rounds 3] [--no-r50]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timing import alternate_rounds, paired_ratio
from torch import nn

from lbsgd_cli.config import ModelConfig
from lbsgd_cli.models import build_model


class Variant:
    def __init__(self, key, model, x, y, precision):
        self.key, self.model, self.x, self.y, self.precision = key, model, x, y, precision
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()


def resnet20_variants(batches: dict[int, int]) -> list[Variant]:
    """Variants keyed (format, precision, side, g), plain BN (format, precision, "plain", batch);
    ``batches[g]`` is the batch at g workers per pass."""
    mcfg = {kernel: OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=20, bn_kernel=kernel))
            for kernel in ("native", "fused")}
    torch.manual_seed(0)
    x0, y0 = torch.randn(max(batches.values()), 3, 32, 32), torch.randint(0, 10, (max(batches.values()),))
    out = []

    def model(bn_group: int | None, kernel: str = "native") -> nn.Module:
        torch.manual_seed(0)
        return build_model(mcfg[kernel], 10, 3, bn_group=bn_group)

    for fmt in ("nchw", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        for precision in ("fp32", "bf16"):
            for batch in sorted(set(batches.values())):  # one plain BN per distinct batch
                x, y = x0[:batch].contiguous(memory_format=mf), y0[:batch]
                out.append(Variant((fmt, precision, "plain", batch), model(None).to(memory_format=mf), x, y,
                                   precision))
            for g, batch in batches.items():
                x, y = x0[:batch].contiguous(memory_format=mf), y0[:batch]
                sides = {"copy-free": model(batch // g), "fused": model(batch // g, "fused")}
                out += [Variant((fmt, precision, side, g), m.to(memory_format=mf), x, y, precision)
                        for side, m in sides.items()]
    return out


def resnet50_variants(batch: int) -> list[Variant]:
    mcfg = OmegaConf.structured(ModelConfig(arch="resnet50"))
    torch.manual_seed(0)
    x0, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    out = []
    for fmt, precision in (("nchw", "fp32"), ("nchw", "bf16"), ("channels_last", "fp32"), ("channels_last", "bf16")):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        torch.manual_seed(0)
        model = build_model(mcfg, 1000, 3, bn_group=batch).to(memory_format=mf)
        out.append(Variant((fmt, precision), model, x0.contiguous(memory_format=mf), y, precision))
    return out


def run_rounds(variants: list[Variant], rounds: int, warmup: int = 2) -> None:
    """One step of every variant per round, the order reversed every round, into each ``Variant.times``."""
    times = alternate_rounds({str(i): v.step for i, v in enumerate(variants)}, rounds, warmup=warmup)
    for i, v in enumerate(variants):
        v.times = times[str(i)]


def speedup(a: Variant, b: Variant) -> float:
    """Median over rounds of speed(a)/speed(b) = time(b)/time(a), both measured in the same round."""
    return paired_ratio(b.times, a.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, default=128, help="fixed batch per pass: n = batch / g")
    size.add_argument("--n", type=int, help="fixed per-worker BN size: batch = g * n")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--r50-batch", type=int, default=16)
    ap.add_argument("--r50-rounds", type=int, default=3)
    ap.add_argument("--no-r50", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.monotonic()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    batches = {g: g * args.n if args.n else args.batch for g in (1, 4, 32)}
    vs = resnet20_variants(batches)
    run_rounds(vs, args.rounds)
    by = {v.key: v for v in vs}

    def ips(v: Variant) -> float:
        return v.x.shape[0] / statistics.median(v.times)

    size = f"n = {args.n} per worker, batch g*{args.n}" if args.n else f"batch {args.batch}"
    print(f"\nResNet-20 (CIFAR), {size}, training step (forward, loss, backward, SGD); "
          f"img/s = batch / median step time over {args.rounds} rounds; ratios: median of per-round ratios\n")
    print("| format | precision | workers/pass g | n | batch | plain BN img/s "
          "| copy-free img/s | fused img/s | copy-free / plain | fused / plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in ("nchw", "channels_last"):
        for precision in ("fp32", "bf16"):
            for g, batch in batches.items():
                plain = by[(fmt, precision, "plain", batch)]
                new, fused = by[(fmt, precision, "copy-free", g)], by[(fmt, precision, "fused", g)]
                print(f"| {fmt} | {precision} | {g} | {batch // g} | {batch} | {ips(plain):.0f} | "
                      f"{ips(new):.0f} | {ips(fused):.0f} | {speedup(new, plain):.2f} | "
                      f"{speedup(fused, plain):.2f} |")
    print("\nbf16 autocast against fp32, same format and BN (copy-free ghost BN):\n")
    print("| format | g | fp32 img/s | bf16 img/s | bf16 / fp32 | channels_last / NCHW (bf16) |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt in ("nchw", "channels_last"):
        for g in (1, 4, 32):
            a, b = by[(fmt, "fp32", "copy-free", g)], by[(fmt, "bf16", "copy-free", g)]
            cl = speedup(by[("channels_last", "bf16", "copy-free", g)], by[("nchw", "bf16", "copy-free", g)])
            print(f"| {fmt} | {g} | {ips(a):.0f} | {ips(b):.0f} | {speedup(b, a):.2f} | {cl:.2f} |")
    print(f"\n(ResNet-20 part: {time.monotonic() - t0:.0f} s)")

    if not args.no_r50:
        t1 = time.monotonic()
        vs50 = resnet50_variants(args.r50_batch)
        run_rounds(vs50, args.r50_rounds, warmup=1)
        by50 = {v.key: v for v in vs50}
        base = by50[("nchw", "fp32")]
        print(f"\nResNet-50 (torchvision), 224x224, batch {args.r50_batch} (one worker: ghost BN = plain BN), "
              f"{args.r50_rounds} rounds\n")
        print("| format | precision | img/s | / fp32 NCHW |")
        print("|---|---|---:|---:|")
        for v in vs50:
            print(f"| {v.key[0]} | {v.key[1]} | {args.r50_batch / statistics.median(v.times):.1f} | "
                  f"{speedup(v, base):.2f} |")
        print(f"\n(ResNet-50 part: {time.monotonic() - t1:.0f} s)")


if __name__ == "__main__":
    main()
