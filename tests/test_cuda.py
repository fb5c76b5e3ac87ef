"""CUDA correctness (issue 28): the checks only a GPU can run; skipped without a CUDA device.

    pytest tests/test_cuda.py                          # on a GPU machine
    LBSGD_TEST_DEVICE=cpu pytest tests/test_cuda.py    # a rehearsal with the CPU as the device

1. A run killed mid-epoch and resumed ends with the weights of an uninterrupted one: bit for bit in the
   bit-exact mode (fp32, NCHW, ``deterministic=true``), within :data:`FAST_RESUME_ATOL` in the fast mode
   ``auto`` chooses on a GPU (bf16, channels_last, cuDNN autotuning: another run may pick other kernels).
2. A training step makes no host synchronisation: ``torch.cuda.set_sync_debug_mode("error")`` raises on any
   (fp32 and bf16; fp16's GradScaler reads its inf flag on the host, torch's own sync, so not fp16).
3. ``batch.k`` workers run in 1, 2 or 4 passes make the step of one pass, within float tolerance.
4. ``lbsgd train`` logs its peak device memory per epoch and ``lbsgd eval`` writes its own to eval.json;
   bf16 weights (``eval.precision=bf16``) take less than fp32 (none of it is recorded off CUDA).

Each test writes what it measured to ``$LBSGD_CUDA_REPORT`` (a JSON-lines file) when that is set, for
``results/gpu.md``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import OptimConfig
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.metrics import read_metrics
from lbsgd_cli.optim import build_optimizer

from .conftest import SHORT, run_cli, small_batch, small_net

DEVICE = os.environ.get("LBSGD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs a CUDA device (LBSGD_TEST_DEVICE=cpu rehearses it)")

FAST_RESUME_ATOL = 5e-2  # largest weight difference allowed after a resume in the fast mode (bf16 weights' updates)
MODES = {"bit-exact": ["precision=fp32", "model.channels_last=false", "deterministic=true"],
         "fast": ["precision=auto", "model.channels_last=auto", "deterministic=auto"]}


def report(**fields) -> None:
    path = os.environ.get("LBSGD_CUDA_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"device": DEVICE, **fields}) + "\n")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path, mode: str) -> None:
    args = [*SHORT, f"device={DEVICE}", *MODES[mode], "checkpoint.every_iters=4", "batch.k=2",
            "log.tensorboard=false"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    assert run_cli("train", f"hydra.run.dir={ref}", *args).returncode == 0
    crash = run_cli("train", f"hydra.run.dir={run}", *args,
                    env={"LBSGD_FAULT_RANK": "0", "LBSGD_FAULT_ITER": "30", "LBSGD_FAULT_KIND": "crash"})
    assert crash.returncode == 70, crash.stderr  # killed at iteration 30, mid-epoch, after the checkpoint of 28
    resumed = run_cli("train", f"hydra.run.dir={run}", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration 28" in resumed.stdout
    a, b = _weights(ref), _weights(run)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    report(test="resume", mode=mode, max_abs_weight_diff=diff)
    if mode == "bit-exact":
        assert diff == 0.0
    else:
        assert diff <= FAST_RESUME_ATOL


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_makes_no_host_sync(precision: str) -> None:
    device = torch.device(DEVICE)
    x, y = (t.to(device) for t in small_batch())
    net = small_net().to(device)
    opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
    plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16, precision=precision)
    train_step(net, opt, (x, y), plan)  # the first step: lazy initialisation (cuDNN, the optimizer's state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        res = train_step(net, opt, (x, y), plan)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert res.loss_sum > 0
    report(test="no_sync", precision=precision, ok=True)


def test_passes_of_workers_make_the_step_of_one_pass() -> None:
    device = torch.device(DEVICE)
    x, y = (t.to(device) for t in small_batch())
    base = small_net().to(device)
    states = []
    for per_pass in (4, 2, 1):
        net = copy.deepcopy(base)
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
        train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=per_pass, n=4, loss_scale=1 / 16))
        states.append({k: v.detach().double().cpu() for k, v in net.state_dict().items()})
    diff = max(float((s[k] - states[0][k]).abs().max()) for s in states[1:] for k in s)
    report(test="passes", max_abs_diff=diff)
    for s in states[1:]:
        for k, v in s.items():
            torch.testing.assert_close(v, states[0][k], rtol=1e-5, atol=1e-5)


def test_train_and_eval_record_their_peak_device_memory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", f"hydra.run.dir={run}", *SHORT, f"device={DEVICE}", "log.tensorboard=false").returncode == 0
    epoch = [r for r in read_metrics(run / "metrics.jsonl") if "val/err" in r][-1]
    peaks = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        proc = run_cli("eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"device={DEVICE}",
                       f"eval.precision={precision}", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr
        peaks[precision] = json.loads((out / "eval.json").read_text())["peak_allocated_mb"]
    report(test="peak_memory", train_peak_allocated_mb=epoch.get("memory/peak_allocated_mb"), eval_peak_mb=peaks)
    if DEVICE == "cuda":
        assert 0 < epoch["memory/peak_allocated_mb"] <= epoch["memory/peak_reserved_mb"]
        assert 0 < peaks["bf16"] < peaks["fp32"]
    else:
        assert "memory/peak_allocated_mb" not in epoch and peaks == {"fp32": None, "bf16": None}
