#!/usr/bin/env python
"""Data-parallel throughput on this machine: W=1 vs W=2 processes for one global minibatch (§3, §4).

    python scripts/bench/bench_ddp.py [--arch cifar_resnet --depth 20] [--k 4 --n 32] [--iters 12]

The paper's minibatch is ``k*n`` whatever the number of processes W. This script runs
lbsgd's own training step (``engine.train_step``: ghost BN over n, no_sync passes, one
allreduce per step) on synthetic 32x32 images, in one run:

1. **Throughput and scaling efficiency.** Images/s of the global minibatch ``k*n`` on
   W=1 (one process, one thread), on W=1 with two threads (the same cores used by
   intra-op parallelism instead), and on W=2 (two processes under gloo, one thread
   each, ``k/2`` workers each). Scaling efficiency = images/s(W=2) / (2 * images/s(W=1)).

2. **Share of communication that overlaps backprop** (§4: the paper overlaps the
   allreduce of gradients with backprop). On each of the W=2 processes, timed in
   rotation so that machine noise hits all three alike (medians over ``--iters``):

   - ``t_local``: forward + backward under ``no_sync()`` (DDP's hooks off: no communication);
   - ``t_ddp``:   forward + backward with DDP's hooks (bucketed allreduce launched during
     backward; ``backward()`` returns once every bucket is reduced);
   - ``t_comm``:  the same allreduce alone: the gradients, in DDP's bucket sizes
     (first bucket 1 MiB, then 25 MiB), reduced with nothing else running.

   exposed = t_ddp - t_local (the median of the per-step differences, both taken in the same
   round) is the communication time backprop did not hide, DDP's own bookkeeping included;
   overlap share = 1 - exposed / t_comm (clipped to [0, 1]) is the share of the allreduce
   hidden behind backprop. On a shared 2-core CPU the gloo threads compete
   with the compute threads for the same cores, so the figure says little about a GPU
   cluster; it is reported as measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf

from lbsgd_cli import distributed as D
from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer
from lbsgd_cli.rules import loss_normaliser
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.parallel import make_parallel


def _setup(args, rank: int, world: int):
    torch.manual_seed(0)
    mcfg = OmegaConf.structured(ModelConfig(arch=args.arch, depth=args.depth, width=args.width))
    model = build_model(mcfg, 10, 3, bn_group=args.n).train()
    if world > 1:
        with warnings.catch_warnings():  # as in parallel.DDP: broadcast_buffers=False keeps ghost-BN buffers local
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    opt = build_optimizer(getattr(model, "module", model), OmegaConf.structured(OptimConfig()), 0.01)
    per = args.k // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(per * args.n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (per * args.n,), generator=g)
    return model, opt, x, y, per


def _step_times(args, model, opt, x, y, per, world, d) -> list[float]:
    plan = StepPlan(per_process=per, per_pass=per, n=args.n, loss_scale=world / loss_normaliser(args.k, args.n),
                    parallel=make_parallel(d))
    times = []
    for i in range(args.warmup + args.iters):
        D.barrier()
        t = time.perf_counter()
        train_step(model, opt, (x, y), plan)
        D.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return times


def _buckets(model) -> list[torch.Tensor]:
    """Gradient-sized tensors in DDP's default bucket sizes (1 MiB first, then 25 MiB)."""
    sizes, cap, current = [], 1 << 20, 0
    for p in reversed([p for p in model.parameters() if p.requires_grad]):  # DDP fills buckets from the end
        current += p.numel() * p.element_size()
        if current >= cap:
            sizes.append(current)
            current, cap = 0, 25 << 20
    if current:
        sizes.append(current)
    return [torch.zeros(s // 4) for s in sizes]


def _overlap_times(args, model, x, y) -> dict[str, list[float]]:
    inner = model.module
    buckets = _buckets(inner)
    out = {"t_local": [], "t_ddp": [], "t_comm": []}

    def fwd_bwd(sync: bool) -> None:
        model.zero_grad(set_to_none=True)
        ctx = model.no_sync() if not sync else torch.enable_grad()
        with ctx:
            F.cross_entropy(model(x), y, reduction="sum").backward()

    for i in range(args.warmup + args.iters):
        for name, fn in (("t_local", lambda: fwd_bwd(False)), ("t_ddp", lambda: fwd_bwd(True)),
                         ("t_comm", lambda: [dist.all_reduce(b) for b in buckets])):
            dist.barrier()
            t = time.perf_counter()
            fn()
            if i >= args.warmup:
                out[name].append(time.perf_counter() - t)
    return out


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = D.init_distributed("cpu", timeout_s=600, backend="gloo")
    model, opt, x, y, per = _setup(args, rank, world)
    steps = _step_times(args, model, opt, x, y, per, world, d)
    overlap = _overlap_times(args, model, x, y)
    queue.put((rank, steps, overlap))
    D.destroy()


def run_single(args, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    d = D.Dist(0, 0, 1, torch.device("cpu"), "single")
    model, opt, x, y, per = _setup(args, 0, 1)
    return _step_times(args, model, opt, x, y, per, 1, d)


def run_two(args) -> tuple[list[float], dict[str, list[float]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (s, o)) for r, s, o in (queue.get() for _ in procs))
    for p in procs:
        p.join()
    steps = [max(a, b) for a, b in zip(results[0][0], results[1][0])]
    overlap = {k: results[0][1][k] + results[1][1][k] for k in results[0][1]}  # per step, both ranks
    return steps, overlap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_resnet")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    kn = args.k * args.n
    print(f"bench_ddp: {args.arch}{'-' + str(args.depth) if args.arch == 'cifar_resnet' else ''}, kn = "
          f"{args.k}x{args.n} = {kn} synthetic 32x32 images per step, {args.iters} timed steps (medians), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")

    # rounds alternate W=1 and W=2 so that a noisy shared machine hurts both alike
    w1, w1t2, w2, ov = [], [], [], {"t_local": [], "t_ddp": [], "t_comm": []}
    for _ in range(2):
        w1 += run_single(args, 1)
        w1t2 += run_single(args, 2)
        steps, overlap = run_two(args)
        w2 += steps
        for key, values in overlap.items():
            ov[key] += values
    ips = {name: kn / statistics.median(t) for name, t in (("W=1, 1 thread", w1), ("W=1, 2 threads", w1t2),
                                                            ("W=2 (gloo), 1 thread each", w2))}
    for name, v in ips.items():
        print(f"  {name:28s} {v:8.1f} images/s")
    eff = ips["W=2 (gloo), 1 thread each"] / (2 * ips["W=1, 1 thread"])
    print(f"scaling efficiency W=2 vs W=1: {eff:.3f}  (images/s(W=2) / (2 * images/s(W=1)))")
    t_local, t_ddp, t_comm = (statistics.median(ov[k]) for k in ("t_local", "t_ddp", "t_comm"))
    exposed = max(statistics.median(b - a for a, b in zip(ov["t_local"], ov["t_ddp"])), 0.0)
    share = min(max(1.0 - exposed / t_comm, 0.0), 1.0) if t_comm > 0 else float("nan")
    mcfg = OmegaConf.structured(ModelConfig(arch=args.arch, depth=args.depth, width=args.width))
    grad_mb = sum(p.numel() for p in build_model(mcfg, 10, 3, args.n).parameters()) * 4 / 1e6
    print(f"per process of W=2: forward+backward without allreduce {t_local * 1e3:.1f} ms, with DDP's allreduce "
          f"{t_ddp * 1e3:.1f} ms, allreduce alone {t_comm * 1e3:.1f} ms ({grad_mb:.2f} MB of gradients)")
    print(f"communication overlapped with backprop: {share * 100:.0f}% (exposed {exposed * 1e3:.1f} ms of "
          f"{t_comm * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
