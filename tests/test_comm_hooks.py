"""Compressed gradient allreduce (``dist.comm_hook``, beyond the paper): payload bytes and 2-process runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lbsgd_cli.distributed import allreduce_bytes

from .conftest import ROOT

# 768 digits, k=4 workers of n=32 taken 2 per pass: 6 iterations, PowerSGD compressing from the third.
CFG = ["threads=1", "log.progress=plain", "log.tensorboard=false", "schedule.epochs=1", "schedule.warmup_epochs=0",
       "schedule.milestones=[1]", "batch.k=4", "batch.n=32", "batch.workers_per_pass=2", "model.width=8",
       "data.train_subset=768", "dist.powersgd_start_iter=2"]


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(20, 10), nn.Linear(10, 3))


def test_allreduce_bytes_per_hook_on_a_tiny_model():
    m = _tiny()
    m[0].bias.requires_grad_(False)  # frozen: sends nothing
    # elements: conv 8x3x3x3 = 216, BN 8 + 8, fc 10x20 = 200 + 10, fc 3x10 = 30 + 3  -> 475
    assert allreduce_bytes(m) == 4 * 475
    assert allreduce_bytes(m, "fp16") == allreduce_bytes(m, "bf16") == 2 * 475
    # rank 1: conv as 8x27 -> 8+27 = 35 (70 < 216: compressed), 10x20 -> 30, 3x10 -> 13 (26 < 30); 1-D as they are
    assert allreduce_bytes(m, "powersgd", 1) == 4 * (35 + 16 + 30 + 10 + 13 + 3)
    # rank 2: 70, 60 (120 < 200), but 3x10 -> 26 is not half of 30: sent whole
    assert allreduce_bytes(m, "powersgd", 2) == 4 * (70 + 16 + 60 + 10 + 30 + 3)
    assert allreduce_bytes(m.double()) == 8 * 475
    ps = pytest.importorskip("torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook")
    if hasattr(ps, "_should_compress"):  # the same rule as torch's hook
        for rows, cols, r, ours in ((8, 27, 1, True), (3, 10, 1, True), (3, 10, 2, False), (10, 20, 2, True)):
            assert ps._should_compress(rows, cols, r, 2)[0] == ours


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LBSGD_FAULT_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_ADDR", "MASTER_PORT")}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())


@pytest.mark.slow
def test_two_gloo_processes_with_fp16_and_powersgd(tmp_path):
    """fp32 W=2 equals W=1; fp16 and PowerSGD (rank 1) runs finish and land near them, not on them."""
    runs = {"w1": tmp_path / "w1"} | {h: tmp_path / h for h in ("none", "fp16", "powersgd")}
    procs = {"w1": subprocess.Popen([sys.executable, "-m", "lbsgd_cli", "train", f"hydra.run.dir={runs['w1']}", *CFG],
                                    cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    for hook in ("none", "fp16", "powersgd"):
        procs[hook] = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
             "-m", "lbsgd_cli", "train", f"hydra.run.dir={runs[hook]}", *CFG, f"dist.comm_hook={hook}"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, f"{name}: {stderr}"
        out[name] = stdout
    mib = {h: float(out[h].split("allreduce payload per step and process: ")[1].split(" MiB")[0])
           for h in ("none", "fp16", "powersgd")}
    assert "allreduce payload" not in out["w1"]  # one process: no allreduce
    assert mib["fp16"] == pytest.approx(mib["none"] / 2, rel=1e-2) and mib["powersgd"] < mib["fp16"]
    w1, w2 = _weights(runs["w1"]), _weights(runs["none"])
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # fp32 W=2 == W=1 bit for bit (same passes)
    d_fp16, d_psgd = _max_diff(runs["none"], runs["fp16"]), _max_diff(runs["none"], runs["powersgd"])
    print(f"max |w - w_fp32|: fp16 {d_fp16:.3g}, powersgd {d_psgd:.3g}")
    assert 0 < d_fp16 < 1e-2 and 0 < d_psgd < 0.2


def test_comm_hook_keys_count_on_resume_but_launcher_keys_do_not():
    from lbsgd_cli.rundir import config_difference

    old = {"optim": {"base_lr": 0.1}, "dist": {"backend": "auto", "timeout_s": 600.0, "requeue": False}}
    new = {"optim": {"base_lr": 0.1, "name": "sgd", "lars_eta": 0.001},
           "dist": {"backend": "gloo", "timeout_s": 30.0, "requeue": True, "comm_hook": "none", "powersgd_rank": 1,
                    "powersgd_start_iter": 2}}
    assert config_difference(old, new) is None  # a run from before these keys resumes with their defaults
    assert config_difference({}, {"data": {"val_subset": 0}}) is None  # any key added since, at its default
    assert config_difference({}, {"data": {"val_subset": 500}}) == "data.val_subset: None -> 500"
    assert config_difference(old, {**new, "dist": {**new["dist"], "comm_hook": "fp16"}}) == \
        "dist.comm_hook: None -> 'fp16'"
    assert config_difference(new, {**new, "dist": {**new["dist"], "powersgd_rank": 2}}) == \
        "dist.powersgd_rank: 1 -> 2"
    assert config_difference(new, {**new, "optim": {**new["optim"], "name": "lars"}}) == "optim.name: 'sgd' -> 'lars'"
