"""precision=fp32|bf16|fp16 (issue 13 item 1): fp16's GradScaler (one update per global step, skipped steps
counted, its state in the checkpoint), exact resume in bf16 and fp16, 1-vs-W in bf16 (test_distributed.py)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli import train as train_module
from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, make_grad_scaler, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer

from .conftest import ROOT, SHORT, lbsgd, run_cli

CPU = torch.device("cpu")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.structured(ModelConfig(arch="small_cnn", width=8)), 10, 1, bn_group=4).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


PLAN = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16, precision="fp16")


def _setup():
    net = _net()
    return net, build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1), make_grad_scaler("fp16", CPU)


def test_only_fp16_gets_a_scaler():
    assert make_grad_scaler("fp32", CPU) is None and make_grad_scaler("bf16", CPU) is None
    assert isinstance(make_grad_scaler("fp16", CPU), torch.amp.GradScaler)


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    net, opt, scaler = _setup()
    before = copy.deepcopy(net.state_dict())
    hook = next(net.parameters()).register_hook(lambda g: g * float("inf"))
    res = train_step(net, opt, _batch(), PLAN, scaler)
    hook.remove()
    assert bool(res.skipped) and scaler.get_scale() == 65536.0 / 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if k.endswith(("weight", "bias")))
    res = train_step(net, opt, _batch(), PLAN, scaler)  # a finite step goes through
    assert not bool(res.skipped) and not torch.equal(before["fc.weight"], net.state_dict()["fc.weight"])


def test_scaler_state_resumes_the_same_steps():
    """Three fp16 steps in a row equal one step, a save of model, optimizer and scaler, a load into fresh
    objects and two more steps: the scale and its growth tracker travel with the checkpoint."""
    net, opt, scaler = _setup()
    for _ in range(3):
        train_step(net, opt, _batch(), PLAN, scaler)
    net2, opt2, scaler2 = _setup()
    train_step(net2, opt2, _batch(), PLAN, scaler2)
    saved = copy.deepcopy((net2.state_dict(), opt2.state_dict(), scaler2.state_dict()))
    net3, opt3, scaler3 = _setup()
    net3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    scaler3.load_state_dict(saved[2])
    for _ in range(2):
        train_step(net3, opt3, _batch(), PLAN, scaler3)
    assert scaler3.state_dict() == scaler.state_dict() and scaler.state_dict()["_growth_tracker"] == 3
    assert all(torch.equal(v, net3.state_dict()[k]) for k, v in net.state_dict().items())


@pytest.mark.slow  # training runs, one resumed
def test_fp16_run_trains_counts_skipped_steps_and_checkpoints_the_scaler(tmp_path, monkeypatch):
    """An fp16 digits run: the loss falls, one injected inf gradient is one skipped step (in metrics and
    the epoch line) and not a divergence, and the checkpoint holds the scaler's state."""
    calls, real_step = [0], train_module.train_step

    def step_with_one_inf_gradient(model, optimizer, batch, plan, scaler=None):
        calls[0] += 1
        hooks = [next(model.parameters()).register_hook(lambda g: g * float("inf"))] if calls[0] == 3 else []
        try:
            return real_step(model, optimizer, batch, plan, scaler)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(train_module, "train_step", step_with_one_inf_gradient)
    run = tmp_path / "run"
    res = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "precision=fp16", "schedule.epochs=2", "data.train_subset=640",
                "log.tensorboard=false")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "val/err" in r]
    assert [r["train/skipped_steps"] for r in epochs] == [1, 0]
    assert "skipped steps 1" in res.stdout
    assert epochs[1]["train/loss"] < epochs[0]["train/loss"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["scaler"]["scale"] == 65536.0 / 2 and ckpt["scaler"]["_growth_tracker"] == ckpt["iteration"] - 3


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_killed_low_precision_run_resumes_to_the_same_weights(tmp_path, precision):
    """Like test_train's fp32 kill-and-resume: SIGKILL after a checkpoint, the same command finishes bit for bit."""
    args = [*SHORT, "checkpoint.every_iters=4", "batch.k=2", f"precision={precision}", "log.tensorboard=false",
            "data.train_subset=768"]  # 12 iterations an epoch: fp16 is slow on a CPU
    ref, run = tmp_path / "ref", tmp_path / "killed"
    assert run_cli("train", f"hydra.run.dir={ref}", *args).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={run}", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt, deadline = run / "checkpoints" / "last.pt", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["iteration"] >= 8:
                break
        except Exception:  # being replaced
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < torch.load(ckpt, weights_only=False)["iteration"] < 3 * (1437 // 64)
    resumed = run_cli("train", f"hydra.run.dir={run}", *args)
    assert resumed.returncode == 0 and "resuming at iteration" in resumed.stdout, resumed.stderr
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False) for d in (ref, run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["scaler"] == b["scaler"]
    val = [[json.loads(x)["val/err"] for x in (d / "metrics.jsonl").read_text().splitlines() if "val/err" in x]
           for d in (ref, run)]
    assert val[0] == val[1]
