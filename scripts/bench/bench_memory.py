#!/usr/bin/env python
"""The seminar's memory table, measured through the CLI itself (issue 28, item 2).

    python scripts/bench/bench_memory.py --out runs/bench/memory        # one GPU: ResNet-50 at 256, a few minutes
    python scripts/bench/bench_memory.py --smoke --out /tmp/mem         # CPU, tiny sizes (the test suite runs it)

1. **Data**: ImageNet-like JPEGs in the ImageNet folder layout (``scripts/bench/bench_gpu.py``'s generator, 1000
   classes; ``--root`` takes a tree of your own), kept in ``--work`` for the next run.
2. **``lbsgd train``**: ResNet-50 (``experiment=imagenet_baseline``: ghost BN over n = 32) at ``--batch``
   images per step, one short epoch, per training precision, with and without ``memory.checkpointing``.
   The peak is the epoch's ``memory/peak_allocated_mb`` from metrics.jsonl (setup, the steps and the val
   pass; one process).
3. **``lbsgd eval``** of the first run's checkpoint at ``eval.batch`` = ``--batch``, per ``offload.mode``
   (none, sequential, model) and ``eval.precision`` (fp32, bf16, fp16): ``peak_allocated_mb`` from eval.json.

Every figure is one process's ``torch.cuda.max_memory_allocated`` (tensors; ``reserved``, what the caching
allocator holds, beside it), so the CUDA context (some 500 MiB that ``nvidia-smi`` adds) is in no row.
A ``lbsgd quantize`` checkpoint is dequantized to fp32 when it is loaded (lbsgd_cli/restore.py), so it
takes the fp32 rows' memory on the device: b-bit weights save disk and host memory, not device memory.
Off CUDA nothing is recorded (the rows say n/a): the CPU run checks the mechanics only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu, beside this file
sys.path.insert(0, str(ROOT))

from lbsgd_cli.metrics import read_metrics  # noqa: E402

MODES = ("none", "sequential", "model")
EVAL_PRECISIONS = ("fp32", "bf16", "fp16")


def lbsgd(args: list[str], log: Path) -> tuple[int, float]:
    """``python -m lbsgd_cli ARGS`` with its output in ``log``: (exit status, seconds)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "lbsgd_cli", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return rc, round(time.perf_counter() - t, 1)


def last_epoch(run: Path) -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if "val/err" in r][-1]


def train_rows(a, data: str, work: Path) -> list[dict]:
    rows = []
    for precision in a.train_precisions.split(","):
        for ckpt in ("false", "true"):
            run = work / f"train-{precision}-ckpt{ckpt}"
            args = ["train", *a.common, f"data.root={data}", f"batch.k={a.batch // a.n}", f"batch.n={a.n}",
                    "schedule.epochs=1", "schedule.milestones=[]", f"precision={precision}",
                    f"memory.checkpointing={ckpt}", f"data.train_subset={a.batch * a.steps}",
                    f"data.val_subset={a.batch}", f"hydra.run.dir={run}"]
            rc, secs = lbsgd(args, work / f"{run.name}.log")
            row = {"command": "train", "mode": "-", "precision": precision, "checkpointing": ckpt == "true",
                   "batch": a.batch, "rc": rc, "seconds": secs, "run": str(run)}
            if rc == 0:
                rec = last_epoch(run)
                row["peak_allocated_mb"] = rec.get("memory/peak_allocated_mb")
                row["peak_reserved_mb"] = rec.get("memory/peak_reserved_mb")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def eval_rows(a, checkpoint: Path, work: Path) -> list[dict]:
    rows = []
    for mode in MODES:
        for precision in a.eval_precisions.split(","):
            out = work / f"eval-{mode}-{precision}"
            args = ["eval", f"checkpoint={checkpoint}", f"eval.batch={a.batch}", f"offload.mode={mode}",
                    f"eval.precision={precision}", f"device={a.device}", f"data.num_workers={a.workers}",
                    f"hydra.run.dir={out}"]
            rc, secs = lbsgd(args, work / f"{out.name}.log")
            row = {"command": "eval", "mode": mode, "precision": precision, "checkpointing": False,
                   "batch": a.batch, "rc": rc, "seconds": secs}
            if rc == 0:
                newest = max(out.glob("eval*.json"), key=lambda p: p.stat().st_mtime)
                r = json.loads(newest.read_text())
                row.update(peak_allocated_mb=r["peak_allocated_mb"], peak_reserved_mb=r["peak_reserved_mb"],
                           top1_err=r["top1_err"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per command, with the ratio to the first row of the same command (fp32 / none / off)."""
    lines = ["| command | offload.mode | precision | memory.checkpointing | batch | peak allocated MiB | "
             "peak reserved MiB | x first row | top-1 err | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[str, float | None] = {}
    for r in rows:
        peak = r.get("peak_allocated_mb")
        base = first.setdefault(r["command"], peak)
        ratio = f"{peak / base:.2f}" if peak and base else "n/a"
        err = f"{r['top1_err'] * 100:.2f}" if "top1_err" in r else "-"
        if r["rc"] != 0:
            peak_s, res_s, ratio, err = f"failed (exit {r['rc']})", "-", "-", "-"
        else:
            peak_s, res_s = _mb(peak), _mb(r.get("peak_reserved_mb"))
        lines.append(f"| {r['command']} | {r['mode']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['batch']} | {peak_s} | {res_s} | {ratio} | {err} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="writes bench_memory.{json,md} here")
    ap.add_argument("--work", type=Path, default=None, help="run directories and generated data (default: --out)")
    ap.add_argument("--root", type=Path, default=None, help="an ImageNet-layout tree; default: generated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256, help="images per step and per eval forward (k*n)")
    ap.add_argument("--n", type=int, default=32, help="ghost BN size (batch.n)")
    ap.add_argument("--steps", type=int, default=4, help="training steps of the epoch")
    ap.add_argument("--train-precisions", default="fp32,bf16")
    ap.add_argument("--eval-precisions", default=",".join(EVAL_PRECISIONS))
    ap.add_argument("--workers", default="auto", help="data.num_workers")
    ap.add_argument("--smoke", action="store_true", help="CPU, ResNet-50 at 64 px, batch 8, few images")
    a = ap.parse_args(argv)
    a.work = a.work or a.out
    size = ["data.crop_size=224", "data.val_resize=256"]
    if a.smoke:
        a.device, a.batch, a.n, a.steps, a.workers = "cpu", 8, 4, 1, "0"
        a.train_precisions, a.eval_precisions = "fp32", "fp32,bf16"
        size = ["data.crop_size=64", "data.val_resize=73", "threads=1"]
    a.common = ["experiment=imagenet_baseline", "data=imagefolder", f"device={a.device}", f"data.num_workers={a.workers}",
                "log.tensorboard=false", "log.progress=plain", *size]
    return a


def main(argv=None) -> list[dict]:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.root is None:
        from bench_gpu import make_imagenet_like

        images, classes = (64, 4) if a.smoke else (max(2000, a.batch * a.steps), 1000)
        info = make_imagenet_like(a.work / "data", images, classes, scale=0.3 if a.smoke else 1.0)
        a.root = Path(info["root"])
    rows = train_rows(a, str(a.root), a.work)
    first = Path(rows[0]["run"]) / "checkpoints" / "last.pt"
    if rows[0]["rc"] == 0:
        rows += eval_rows(a, first, a.work)
    import torch

    dev = torch.cuda.get_device_name(0) if a.device == "cuda" and torch.cuda.is_available() else "CPU"
    head = (f"device: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}; ResNet-50, ghost BN n = {a.n}, "
            f"batch {a.batch}; data {a.root}\n\n")
    (a.out / "bench_memory.json").write_text(json.dumps({"device": dev, "torch": torch.__version__, "rows": rows},
                                                        indent=2) + "\n")
    (a.out / "bench_memory.md").write_text(head + table(rows))
    print(head + table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
