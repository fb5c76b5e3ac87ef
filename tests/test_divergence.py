"""Divergence (issue 12 item 5): a non-finite loss stops the run at once, keeps the checkpoint from before
it, writes ``summary.json`` with ``"diverged": true`` and exits 5; a ``-m`` sweep still runs its next job."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lbsgd_cli.divergence import DivergenceWatch
from lbsgd_cli.errors import Diverged

from .conftest import SHORT, lbsgd

# base_lr 1e8 without warmup: the digits net's BN variances overflow at iteration 3 of the debug preset and
# its loss is inf/nan at iteration 6 (measured)
BLOW_UP = [*SHORT, "optim.base_lr=1e8", "schedule.warmup=none", "checkpoint.every_iters=2", "log.progress=none",
           "log.tensorboard=false"]


def test_watch_keeps_the_first_bad_iteration_and_names_it():
    watch = DivergenceWatch(torch.device("cpu"))
    watch.update(torch.tensor(1.0), 0)
    watch.check(lambda i: 0.1, None)  # finite: nothing
    watch.update(torch.tensor(float("nan")), 7)
    watch.update(torch.tensor(float("inf")), 8)
    try:
        watch.check(lambda i: 0.1 * i, 6)
    except Diverged as exc:
        assert exc.iteration == 7
        assert str(exc) == "non-finite loss at iteration 7 (lr 0.7); checkpoint kept from iteration 6"
    else:
        raise AssertionError("no Diverged")


def test_a_diverging_run_stops_keeps_its_checkpoint_and_says_so(tmp_path):
    run = tmp_path / "run"
    res = lbsgd("train", f"hydra.run.dir={run}", *BLOW_UP)
    assert res.returncode == 5
    line = res.stderr.strip()
    assert line.count("\n") == 0
    assert re.match(r"lbsgd: diverged: non-finite (loss|weights or BN statistics) at iteration \d+ ", line), line
    summary = json.loads((run / "summary.json").read_text())
    at = summary["diverged_at_iteration"]
    assert summary["diverged"] is True and summary["lr"] == 1e8 * 128 / 256 and at > 0
    assert f"at iteration {at} (lr 5e+07); checkpoint kept from iteration " in line
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert 0 < ckpt["iteration"] <= at and f"kept from iteration {ckpt['iteration']}" in line
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["iter"] <= at for r in metrics if "iter" in r)  # nothing logged after the divergence

    written = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    again = lbsgd("train", f"hydra.run.dir={run}", *BLOW_UP)  # the same command does not retrain over it
    assert again.returncode == 5 and again.stderr.strip().count("\n") == 0
    assert "diverged at iteration" in again.stderr and "nothing was run" in again.stderr
    assert written == {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow  # a sweep of two training runs
def test_a_sweep_runs_on_after_a_diverged_job_and_exits_5(tmp_path):
    rest = [a for a in BLOW_UP if not a.startswith("optim.base_lr")]
    res = lbsgd("train", "-m", "optim.base_lr=1e8,0.1", *rest, "schedule.epochs=1", "schedule.milestones=[5]",
                "threads=1", f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 5, res.stderr
    assert res.stderr.count("lbsgd: diverged: non-finite") == 1
    assert "1 job(s) of this sweep diverged" in res.stderr
    good = json.loads(next(tmp_path.glob("*base_lr=0.1*")).joinpath("summary.json").read_text())
    bad = json.loads(next(tmp_path.glob("*base_lr=100000000.0*")).joinpath("summary.json").read_text())
    assert good["diverged"] is False and good["epochs"] == 1 and bad["diverged"] is True
