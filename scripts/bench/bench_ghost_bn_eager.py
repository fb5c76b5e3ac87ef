"""Eager training-step time of ghost BN now against an earlier revision of lbsgd_cli/ghost_bn.py (issue 23).

Issue 23 made ghost BN traceable by torch.compile (pending statistics in buffers, a plain-op formula when
compiling); eagerly the per-slice native kernel (and the separately compiled fused kernel) still run. This
measures that eager training did not slow down: CIFAR ResNet-20, batch 128, ghost BN over n = 32 (g = 4),
one training step (forward, cross-entropy, backward, SGD step, the deferred running-statistics flush of
lbsgd's train_step), with the ``--old`` revision's module (read with ``git show``, default ``23daf4c``, the
last commit before issue 23) and the current one, on one thread. The two variants alternate (the order
reverses every round); the ratio is the median over rounds of old/new within a round. With ``--compile``
both models are compiled (``nn.Module.compile``, as ``compile=true``; NCHW, native kernel only): the old
module's ghost BN breaks the graph at every BN layer, the new one is traced into one graph. Usage::

    PYTHONPATH=. python scripts/bench/bench_ghost_bn_eager.py [--rounds 9] [--old REV] [--fused] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from omegaconf import OmegaConf

import lbsgd_cli
from lbsgd_cli import ghost_bn as new_module
from lbsgd_cli.config import ModelConfig
from lbsgd_cli.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def load_old(rev: str):
    """lbsgd_cli/ghost_bn.py at ``rev`` as the module ``lbsgd_cli._ghost_bn_old`` (its relative imports work)."""
    source = subprocess.run(["git", "show", f"{rev}:lbsgd_cli/ghost_bn.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("lbsgd_cli._ghost_bn_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = lbsgd_cli.__name__
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev}:lbsgd_cli/ghost_bn.py", "exec"), module.__dict__)
    return module


def make(module, kernel: str, fmt: torch.memory_format, n: int):
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=20)), 10, 3, bn_group=None)
    module.convert_to_ghost_bn(model, n, kernel)
    model = model.to(memory_format=fmt).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step(module, model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    with module.deferred_running_stats(model) as layers:
        F.cross_entropy(model(x), y).backward()
    opt.step()
    module.flush_running_stats(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--old", default="23daf4c", help="the git revision to compare with")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--fused", action="store_true", help="also model.bn_kernel=fused (compiles first)")
    ap.add_argument("--compile", action="store_true", help="compile both models (NCHW, native only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old_module = load_old(args.old)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; ResNet-20, batch "
          f"{args.batch}, n = {args.n}; old = {args.old}, {args.rounds} rounds"
          + ("; both compiled (nn.Module.compile)" if args.compile else "; eager"))
    print("| bn_kernel | format | old ms | new ms | old/new (median of round ratios) |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    formats = (("nchw", torch.contiguous_format),) if args.compile else \
        (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last))
    for kernel in ("native", "fused") if args.fused and not args.compile else ("native",):
        for name, fmt in formats:
            x = x0.contiguous(memory_format=fmt)
            variants = {"old": (old_module, *make(old_module, kernel, fmt, args.n)),
                        "new": (new_module, *make(new_module, kernel, fmt, args.n))}
            if args.compile:
                # two models (old and new ghost BN) share the network's code: room for both sets of entries
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                for _, model, _ in variants.values():
                    model.compile()
            for mod, model, opt in variants.values():  # warm-up (the fused kernel, or --compile, compiles here)
                for _ in range(2):
                    step(mod, model, opt, x, y)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for key in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    mod, model, opt = variants[key]
                    t = time.perf_counter()
                    step(mod, model, opt, x, y)
                    times[key].append(time.perf_counter() - t)
            ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
            print(f"| {kernel} | {name} | {1e3 * statistics.median(times['old']):.0f} | "
                  f"{1e3 * statistics.median(times['new']):.0f} | {ratio:.3f} |", flush=True)
    print("ratio > 1: the new module is faster; < 1: slower")


if __name__ == "__main__":
    main()
