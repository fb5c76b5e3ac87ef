"""Latency of real int8 inference vs fp32 on the CPU, measured in one process.

The int8 network comes from torchao's pt2e flow with the X86InductorQuantizer (see
lbsgd_cli/int8.py), compiled by inductor; fp32 is timed eagerly and compiled the same way.
Repetitions alternate between the networks (fp32 eager, fp32 compiled, int8 compiled, ...)
so that load from other processes slows all of them alike; the medians are reported.

    python scripts/bench/bench_quantize.py                                   # ResNet-20 (CIFAR), random weights
    python scripts/bench/bench_quantize.py --checkpoint runs/train/.../last.pt --data-root /tmp/cifar10

With a checkpoint, calibration uses training images and the int8 val error is reported too.
torch.compile takes minutes on a small CPU; nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lbsgd_cli.int8 import compile_cpu, fixed_batch_eval, interleaved_latency, plain_batchnorm, quantize_pt2e_int8
from lbsgd_cli.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint of lbsgd train (default: random ResNet-20 for CIFAR)")
    p.add_argument("--data-root", help="the data set's folder, if it moved since training")
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth without a checkpoint")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = None
    if args.checkpoint:
        from lbsgd_cli.quantize_run import calibration_batches, load_source

        cfg = OmegaConf.create({"checkpoint": args.checkpoint, "data_root": args.data_root})
        model, train_cfg, data, _ = load_source(cfg, torch.device("cpu"))
        calib = calibration_batches(data, args.calib_batches, args.batch, 0, torch.device("cpu"))
        name = f"{train_cfg.model.arch} ({args.checkpoint})"
    else:
        mcfg = OmegaConf.create({"arch": "cifar_resnet", "depth": args.depth, "width": 32, "zero_init_residual": False,
                                 "bn_momentum": 0.1, "bn_eps": 1e-5, "fc_init_std": 0.01})
        model = build_model(mcfg, 10, 3, bn_group=None).eval()
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(args.batch, 3, 32, 32, generator=g) for _ in range(args.calib_batches)]
        name = f"cifar_resnet depth {args.depth} (random weights)"

    x = calib[0][: args.batch]
    t0 = time.monotonic()
    fp32 = plain_batchnorm(copy.deepcopy(model)).eval()
    int8 = compile_cpu(quantize_pt2e_int8(model, x, calib))
    fp32_compiled = compile_cpu(copy.deepcopy(fp32))
    with torch.no_grad():
        max_diff = float((int8(x) - fp32(x)).abs().max())
        fp32_compiled(x)
    compile_s = time.monotonic() - t0
    lat = interleaved_latency({"fp32_eager": fp32, "fp32_inductor": fp32_compiled, "int8_inductor": int8}, x,
                              reps=args.reps)
    result = {
        "model": name,
        "batch": args.batch,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "compile_s": round(compile_s, 1),
        "max_abs_logit_diff_int8_vs_fp32": round(max_diff, 4),
        **{f"{k}_ms": round(v * 1e3, 3) for k, v in lat.items()},
        "speedup_int8_vs_fp32_inductor": round(lat["fp32_inductor"] / lat["int8_inductor"], 3),
        "speedup_int8_vs_fp32_eager": round(lat["fp32_eager"] / lat["int8_inductor"], 3),
    }
    try:
        import torchao

        result["torchao"] = torchao.__version__
    except ImportError:
        pass
    if data is not None:
        from lbsgd_cli.data import val_batches
        from lbsgd_cli.engine import evaluate

        dev = torch.device("cpu")
        result["fp32_top1_err"] = evaluate(model, val_batches(data, 0, 1, 256, dev))["top1_err"]
        result["int8_top1_err"] = fixed_batch_eval(int8, val_batches(data, 0, 1, 256, dev), args.batch)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
