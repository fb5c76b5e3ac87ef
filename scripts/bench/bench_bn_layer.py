#!/usr/bin/env python
"""BN layers alone: forward + in-place ReLU + backward of ResNet-20's three BN shapes, per kernel.

    PYTHONPATH=. python scripts/bench/bench_bn_layer.py [--rounds 7] [--reps 10] [--batch 128] [--n 32]

For each precision (fp32, bf16 inputs) and memory format, times ``--reps`` forward/backward calls of
:class:`lbsgd_cli.ghost_bn.GhostBatchNorm2d` on a ``(batch, C, H, W)`` input per side:

- ``native g=1``: ``model.bn_kernel=native`` over the whole batch (PyTorch's plain batch norm);
- ``native g``: the same kernel per worker's slice, ``batch/n`` workers of ``n`` (the paper's ghost BN);
- ``fused g=1`` and ``fused g``: ``model.bn_kernel=fused`` (one compiled kernel per call; compiled in
  the untimed warm-up).

The per-shape times are summed with ResNet-20's layer counts (7 BN layers at 16 channels 32x32, 6 at
32 channels 16x16, 6 at 64 channels 8x8) into the BN time of one training step. One thread; the sides
alternate within a round and the order reverses every round; a ratio is the median over rounds of the
ratio within a round (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F
from timing import alternate_rounds, median_ms, paired_ratio

from lbsgd_cli.ghost_bn import GhostBatchNorm2d

SHAPES = ((16, 32, 7), (32, 16, 6), (64, 8, 6))  # (channels, side, layers in ResNet-20)


def layer_step(m: GhostBatchNorm2d, x0: torch.Tensor, dy: torch.Tensor) -> None:
    """One forward + ReLU + backward of the BN layer ``m``."""
    x = x0.detach().requires_grad_(True)
    F.relu(m(x), inplace=True).backward(dy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = args.batch // args.n
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, n = {args.n} (g = {g}), {args.rounds} rounds x "
          f"{args.reps} calls, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    sides = {"native g=1": ("native", args.batch), f"native g={g}": ("native", args.n),
             "fused g=1": ("fused", args.batch), f"fused g={g}": ("fused", args.n)}
    names = list(sides)
    print("| precision | format | " + " | ".join(f"{s} ms" for s in names) + f" | fused g={g} / native g={g} "
          f"| fused g={g} / native g=1 | fused g=1 / native g=1 |\n|---|---|" + "---:|" * (len(names) + 3))
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            step = {s: [0.0] * args.rounds for s in names}  # ResNet-20's BN time per step, per round
            for c, side, layers in SHAPES:
                gen = torch.Generator().manual_seed(0)
                x0 = torch.randn(args.batch, c, side, side, generator=gen).to(dtype).contiguous(memory_format=fmt)
                dy = torch.randn(args.batch, c, side, side, generator=gen).to(dtype).contiguous(memory_format=fmt)
                mods = {s: GhostBatchNorm2d(c, size, kernel) for s, (kernel, size) in sides.items()}
                fns = {s: functools.partial(layer_step, m, x0, dy) for s, m in mods.items()}
                # 2 warm-up calls each: allocator, compilation of the fused kernels
                times = alternate_rounds(fns, args.rounds, iters=args.reps, warmup=2)
                for s in names:
                    for r, t in enumerate(times[s]):
                        step[s][r] += layers * t

            def ratio(a: str, b: str) -> float:
                return paired_ratio(step[b], step[a])

            ms = " | ".join(f"{median_ms(step[s]):.1f}" for s in names)
            print(f"| {'bf16' if dtype == torch.bfloat16 else 'fp32'} | "
                  f"{'channels_last' if fmt == torch.channels_last else 'nchw'} | {ms} | "
                  f"{ratio(names[3], names[1]):.2f} | {ratio(names[3], names[0]):.2f} | "
                  f"{ratio(names[2], names[0]):.2f} |", flush=True)
    print("\n(ratios are speed ratios: > 1 means the first side is faster)")


if __name__ == "__main__":
    main()
