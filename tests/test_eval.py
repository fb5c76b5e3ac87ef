"""``lbsgd eval`` end to end: training's val error reproduced, torchrun split, no overwrite, bad checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lbsgd_cli.data import load_data, val_batches
from lbsgd_cli.distributed import Dist
from lbsgd_cli.evaluate import cast_for_eval, recompute_bn_stats
from lbsgd_cli.restore import model_from_checkpoint
from lbsgd_cli.engine import evaluate

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # every test here evaluates a run trained by `lbsgd train` in a subprocess

# digits, 3 short epochs: the last val error is far from zero, so an error in eval would show.
TRAIN = ["threads=1", "log.progress=none", "log.tensorboard=false", "schedule.epochs=2", "schedule.warmup_epochs=1",
         "schedule.milestones=[1]", "model.width=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    run_cli("train", f"hydra.run.dir={run}", *TRAIN, check=True)
    return run


def _last_val(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "val/err" in r][-1]


def test_eval_reproduces_the_last_val_error(trained, tmp_path):
    # lbsgd's own run directories are named by overrides: '=' and ',' in paths need no quoting
    ckpt = tmp_path / "batch.k=2,seed=0" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((trained / "checkpoints" / "last.pt").read_bytes())
    out = tmp_path / "ev,k=2"
    proc = run_cli("eval", f"checkpoint={ckpt}", f"hydra.run.dir={out}", "threads=1", check=True)
    assert "top-1 error" in proc.stdout and "images 360" in proc.stdout
    r = json.loads((out / "eval.json").read_text())
    last = _last_val(trained)
    assert r["top1_err"] == last["val/err"] and r["top5_err"] == last["val/top5_err"]  # exactly
    assert r["loss"] == last["val/loss"] and r["images"] == 360
    assert r["checkpoint"] == str(ckpt.resolve()) and r["iteration"] == 2 * (1437 // 128)
    assert r["offload_mode"] == "none" and r["bn_recompute"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_splits_the_val_set_with_the_numbers_of_one_process(trained, tmp_path):
    """Two gloo ranks, BN recompute (all-reduced) and whole-model offloading, into a folder that has an eval.json."""
    ckpt = trained / "checkpoints" / "last.pt"
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text("an earlier result\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "lbsgd_cli", "eval", f"checkpoint={ckpt}",
                           "threads=1", "eval.bn_recompute=2", "eval.batch=50", "offload.mode=model",
                           f"hydra.run.dir={out}"],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("lbsgd eval:") == 1  # rank 0 prints
    assert (out / "eval.json").read_text() == "an earlier result\n"  # never overwritten
    two = json.loads((out / "eval-1.json").read_text())
    assert two["world_size"] == 2 and two["offload_mode"] == "model" and two["bn_recompute_images"] == 2 * 128

    # the same evaluation on one process, in this process
    model, cfg = model_from_checkpoint(ckpt)
    data = load_data(cfg.data)
    cpu = Dist(0, 0, 1, torch.device("cpu"), "single")
    recompute_bn_stats(model, data, cfg, cpu, batches=2, chunk=50)
    one = evaluate(model, val_batches(data, 0, 1, 50, cpu.device))
    assert (one["top1_err"], one["top5_err"], one["images"]) == (two["top1_err"], two["top5_err"], two["images"])
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["top1_err"] != two["train_last_val"]["top1_err"]  # the recompute did change the statistics


def test_half_precision_eval_holds_half_weights_and_matches_fp32(trained, tmp_path):
    """eval.precision: bf16 under sequential offloading through the CLI, fp16 (with BN recompute) in process;
    both within a few images of fp32 on the 360 val images, BN kept fp32, logits back in fp32."""
    ckpt = trained / "checkpoints" / "last.pt"
    out = tmp_path / "bf16"
    run_cli("eval", f"checkpoint={ckpt}", f"hydra.run.dir={out}", "threads=1", "eval.precision=bf16",
            "offload.mode=sequential", check=True)
    r = json.loads((out / "eval.json").read_text())
    fp32 = r["train_last_val"]
    assert r["precision"] == "bf16" and r["offload_mode"] == "sequential"
    assert r["peak_allocated_mb"] is None and r["peak_reserved_mb"] is None  # a CPU has no device memory to measure
    assert abs(r["top1_err"] - fp32["top1_err"]) <= 3 / 360 and r["loss"] == pytest.approx(fp32["loss"], rel=0.02)

    model, cfg = model_from_checkpoint(ckpt)
    data = load_data(cfg.data)
    ref = evaluate(model, val_batches(data, 0, 1, 50, torch.device("cpu")))
    half = cast_for_eval(model_from_checkpoint(ckpt)[0], "fp16")
    dtypes = {type(m).__name__: {p.dtype for p in m.parameters(recurse=False)} for m in half.modules()}
    assert dtypes["Conv2d"] == {torch.float16} and dtypes["Linear"] == {torch.float16}
    assert all(p.dtype == torch.float32 for m in half.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for p in [*m.parameters(recurse=False), m.running_mean, m.running_var])
    x, _ = next(iter(val_batches(data, 0, 1, 50, torch.device("cpu"))))
    with torch.no_grad():
        assert half(x).dtype == torch.float32
    got = evaluate(half, val_batches(data, 0, 1, 50, torch.device("cpu")))
    assert abs(got["top1_err"] - ref["top1_err"]) <= 3 / 360 and got["loss"] == pytest.approx(ref["loss"], rel=0.01)
    cpu = Dist(0, 0, 1, torch.device("cpu"), "single")
    assert recompute_bn_stats(half, data, cfg, cpu, batches=1, chunk=64) == 128  # runs through the half network
    assert all(m.running_mean.dtype == torch.float32 for m in half.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_bad_checkpoints_are_one_line_errors_naming_the_file(trained, tmp_path):
    good = trained / "checkpoints" / "last.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    proc = run_cli("eval", f"checkpoint={cut}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"lbsgd: error: checkpoint: {cut} ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "ev" / "eval.json").exists()
    missing = run_cli("eval")
    assert missing.returncode == 2 and "checkpoint=PATH" in missing.stderr
