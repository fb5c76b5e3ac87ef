#!/usr/bin/env python
"""Steps across nodes on shaped links: time per step, the allreduce, and the part of it backward does not hide.

    scripts/slurm/slurm_cluster.sh up /tmp/nodes --nodes 3          # as root: 3 nodes in network namespaces
    python scripts/bench/bench_multinode.py drive /tmp/nodes [--rates none,1gbit,100mbit] [--out results/multinode]

``drive`` shapes every node's link with tc (``slurm_cluster.sh shape``), and for each rate, world size W = 1, 2, 3
(one rank per node, gloo over the veth links), CIFAR ResNet-8 and ResNet-20, and ``dist.comm_hook`` none / fp16
runs ``srun -N W -n W python scripts/bench/bench_multinode.py rank ...``. Each rank runs lbsgd's own step
(``engine.train_step``: k = 2 workers of n = 32 per rank, ghost BN, DDP with the hook) on synthetic 32x32 images,
then, in rotation so that a noisy machine hurts each alike (medians):

- ``t_local``: forward + backward under ``no_sync()`` (no communication): the compute;
- ``t_ddp``: forward + backward with DDP's bucketed allreduce, launched during backward;
- ``t_comm``: the same allreduce alone (the gradient, or its fp16 copy, in DDP's bucket sizes).

exposed = median(t_ddp - t_local): the allreduce time backward did not hide. The figures go to
``OUT/steps.csv`` (the columns ``scripts/experiments/check_plan_local.py`` reads) and a table on stdout. The machine has
2 cores: 3 ranks share them, so the compute at W = 3 is slower than at W = 1 (``compute_s`` is measured at
each W and is what the planner's check takes as compute).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["arch", "depth", "world", "rate_gbit", "delay_ms", "comm_hook", "step_s", "step_s_w1", "compute_s",
           "grad_bytes", "allreduce_s", "exposed_s", "rtt_ms"]


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from lbsgd_cli import distributed as D
    from lbsgd_cli.config import ModelConfig, OptimConfig
    from lbsgd_cli.engine import StepPlan, train_step
    from lbsgd_cli.models import build_model
    from lbsgd_cli.optim import build_optimizer
    from lbsgd_cli.parallel import make_parallel
    from lbsgd_cli.rules import loss_normaliser

    torch.set_num_threads(1)
    d = D.init_distributed("cpu", timeout_s=120, backend="gloo", rendezvous_s=120)
    world, k, n = d.world_size, args.k * d.world_size, args.n
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=args.depth)), 10, 3, n).train()
    grad_bytes = D.allreduce_bytes(model, args.hook)
    if world > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        D.register_comm_hook(model, args.hook)
    opt = build_optimizer(getattr(model, "module", model), OmegaConf.structured(OptimConfig()), 0.01)
    g = torch.Generator().manual_seed(d.rank)
    x, y = torch.randn(args.k * n, 3, 32, 32, generator=g), torch.randint(0, 10, (args.k * n,), generator=g)
    plan = StepPlan(per_process=args.k, per_pass=args.k, n=n, loss_scale=world / loss_normaliser(k, n),
                    parallel=make_parallel(d))
    element = 2 if args.hook in ("fp16", "bf16") else 4
    bucket = torch.zeros(grad_bytes // element, dtype=torch.float16 if element == 2 else torch.float32)

    def fwd_bwd(sync: bool) -> None:
        model.zero_grad(set_to_none=True)
        ctx = model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
        with ctx:
            F.cross_entropy(model(x), y, reduction="sum").backward()

    timers = {"step": lambda: train_step(model, opt, (x, y), plan), "t_local": lambda: fwd_bwd(False)}
    if world > 1:
        timers.update(t_ddp=lambda: fwd_bwd(True), t_comm=lambda: dist.all_reduce(bucket),
                      rtt=lambda: dist.all_reduce(torch.zeros(1)))
    out: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(args.warmup + args.iters):
        for name, fn in timers.items():
            D.barrier()
            t = time.perf_counter()
            fn()
            D.barrier()
            if i >= args.warmup:
                out[name].append(time.perf_counter() - t)
    D.barrier()  # every rank's last collective done before any leaves
    med = {name: statistics.median(v) for name, v in out.items()}
    exposed = statistics.median(b - a for a, b in zip(out["t_local"], out["t_ddp"])) if world > 1 else 0.0
    row = {"step_s": med["step"], "compute_s": med["t_local"], "allreduce_s": med.get("t_comm", 0.0),
           "exposed_s": max(exposed, 0.0), "grad_bytes": grad_bytes, "rtt_ms": med.get("rtt", 0.0) * 1e3,
           "hosts": list(d.hosts)}
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if d.rank == 0:  # the step is as slow as its slowest rank; each rank's compute and exposure, averaged
        agg = {key: max(r[key] for r in rows) if key == "step_s" else statistics.mean(r[key] for r in rows)
               for key in ("step_s", "compute_s", "allreduce_s", "exposed_s", "rtt_ms")}
        agg.update(grad_bytes=grad_bytes, hosts=rows[0]["hosts"])
        print("RESULT " + json.dumps(agg), flush=True)
    D.barrier()
    D.destroy()


def drive(args) -> None:
    cluster = Path(args.cluster)
    env = {**os.environ, "SLURM_CONF": str(cluster / "slurm.conf"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SLURM_NTASKS"))]:
        del env[key]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def shape(rate: str) -> None:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "slurm_cluster.sh"), "shape", str(cluster), rate],
                       check=True, env=env, timeout=60)

    def run(world: int, depth: int, hook: str) -> dict:
        cmd = ["srun", f"--nodes={world}", f"--ntasks={world}", "--ntasks-per-node=1", "--cpu-bind=none",
               sys.executable, str(Path(__file__).resolve()), "rank", f"--depth={depth}", f"--hook={hook}",
               f"--iters={args.iters}", f"--warmup={args.warmup}", f"--k={args.k}"]
        for attempt in (1, 2):  # a rank may abort in gloo's teardown (seen once in 26): measure again
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                return json.loads(lines[-1][len("RESULT "):])
            print(f"bench_multinode: attempt {attempt} of `{' '.join(cmd[-6:])}` failed: "
                  f"{proc.stderr.strip().splitlines()[-1:]}", flush=True)
        raise SystemExit(f"bench_multinode: `{' '.join(cmd)}` failed twice: {proc.stderr.strip()[-2000:]}")

    rates = args.rates.split(",")
    w1 = {}
    try:
        shape("none")
        for depth in args.depths:
            w1[depth] = run(1, depth, "none")
        for rate in rates:
            shape(rate)
            for depth in args.depths:
                for world in (2, 3):
                    for hook in ("none", "fp16"):
                        r = run(world, depth, hook)
                        gbit = "" if rate == "none" else (float(rate[:-4]) if rate.endswith("gbit")
                                                          else float(rate[:-4]) / 1000)
                        rows.append({"arch": "cifar_resnet", "depth": depth, "world": world, "rate_gbit": gbit,
                                     "delay_ms": 0, "comm_hook": hook, "step_s": r["step_s"],
                                     "step_s_w1": w1[depth]["step_s"], "compute_s": r["compute_s"],
                                     "grad_bytes": r["grad_bytes"], "allreduce_s": r["allreduce_s"],
                                     "exposed_s": r["exposed_s"], "rtt_ms": r["rtt_ms"]})
                        print(f"rate {rate:8s} resnet-{depth:<2d} W={world} hook={hook:4s} "
                              f"step {r['step_s'] * 1e3:7.1f} ms (W=1 {w1[depth]['step_s'] * 1e3:6.1f}), compute "
                              f"{r['compute_s'] * 1e3:6.1f}, allreduce alone {r['allreduce_s'] * 1e3:6.1f}, exposed "
                              f"{r['exposed_s'] * 1e3:6.1f}, {r['grad_bytes'] / 1e6:.2f} MB, rtt "
                              f"{r['rtt_ms']:.2f} ms on {','.join(r['hosts'])}", flush=True)
    finally:
        shape("none")
    for depth in args.depths:  # W = 1: no allreduce, any link
        rows.insert(0, {"arch": "cifar_resnet", "depth": depth, "world": 1, "rate_gbit": "", "delay_ms": 0,
                        "comm_hook": "none", "step_s": w1[depth]["step_s"], "step_s_w1": w1[depth]["step_s"],
                        "compute_s": w1[depth]["compute_s"], "grad_bytes": w1[depth]["grad_bytes"],
                        "allreduce_s": 0.0, "exposed_s": 0.0, "rtt_ms": 0.0})
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out / 'steps.csv'} ({len(rows)} rows)")


def report(args) -> None:
    """The markdown table of results/performance.md, "Across nodes", from OUT/steps.csv (and OUT/plan_check.csv,
    `scripts/experiments/check_plan_local.py`'s predictions, where present): rebuilt from the committed files alone."""
    out = Path(args.out)
    rows = list(csv.DictReader(open(out / "steps.csv", newline="")))
    pred = {}
    if (out / "plan_check.csv").exists():
        for r in csv.DictReader(open(out / "plan_check.csv", newline="")):
            pred[(r["depth"], r["world"], f"{float(r['rate_gbit']):g}", r["comm_hook"])] = float(r["pred_step_s"])
    print("| network | link | W | hook | step ms | / W=1 | compute ms | allreduce alone ms | exposed ms | exposed / "
          "step | planned step ms (error) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = {k: float(r[k]) for k in ("step_s", "step_s_w1", "compute_s", "allreduce_s", "exposed_s")}
        link = "-" if r["world"] == "1" else ("veth" if r["rate_gbit"] == "" else f"{float(r['rate_gbit']):g} Gbit/s")
        key = (r["depth"], r["world"], "" if r["rate_gbit"] == "" else f"{float(r['rate_gbit']):g}", r["comm_hook"])
        plan = f"{pred[key] * 1e3:.0f} ({pred[key] / f['step_s'] - 1:+.0%})" if key in pred else "-"
        print(f"| ResNet-{r['depth']} | {link} | {r['world']} | {r['comm_hook']} | {f['step_s'] * 1e3:.0f} | "
              f"{f['step_s'] / f['step_s_w1']:.2f} | {f['compute_s'] * 1e3:.0f} | {f['allreduce_s'] * 1e3:.1f} | "
              f"{f['exposed_s'] * 1e3:.1f} | {f['exposed_s'] / f['step_s']:.0%} | {plan} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rank", help="one rank of a measurement (started by srun)")
    r.add_argument("--depth", type=int, default=8)
    r.add_argument("--hook", default="none", choices=["none", "fp16"])
    d = sub.add_parser("drive", help="every measurement on a cluster of scripts/slurm/slurm_cluster.sh")
    d.add_argument("cluster", help="the DIR of `scripts/slurm/slurm_cluster.sh up DIR --nodes 3`")
    d.add_argument("--rates", default="none,1gbit,100mbit", help="tc rates of every link, comma-separated")
    d.add_argument("--depths", type=int, nargs="+", default=[8, 20])
    d.add_argument("--out", default=str(ROOT / "results" / "multinode"))
    t = sub.add_parser("report", help="the markdown table of results/performance.md from OUT/steps.csv")
    t.add_argument("--out", default=str(ROOT / "results" / "multinode"))
    for p in (r, d):
        p.add_argument("--k", type=int, default=2, help="workers of n = 32 per rank (weak scaling)")
        p.add_argument("--n", type=int, default=32)
        p.add_argument("--iters", type=int, default=10)
        p.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    {"rank": rank_main, "drive": drive, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
