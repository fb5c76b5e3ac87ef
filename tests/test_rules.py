"""The paper's formulas (rules.py), pinned to hand computations, and the rate a real run uses."""

from __future__ import annotations

import json
import math

import pytest

from lbsgd_cli.choices import Decay, LRRule, Warmup
from lbsgd_cli.validation import validate
from lbsgd_cli.errors import UserError
from lbsgd_cli.rules import iters_per_epoch, loss_normaliser, lr_at, momentum_correction, peak_lr

from .conftest import compose, lbsgd


def test_linear_scaling_rule_matches_paper_table():
    # §2.1 / Table 1: kn = 256 -> 0.1, kn = 8k -> 3.2
    assert peak_lr(0.1, 8, 32, 256) == pytest.approx(0.1)
    assert peak_lr(0.1, 256, 32, 256) == pytest.approx(3.2)
    # Table 2a alternatives at 8k: sqrt(32) * 0.1 and unscaled 0.1
    assert peak_lr(0.1, 256, 32, 256, LRRule.sqrt) == pytest.approx(0.1 * math.sqrt(32))
    assert peak_lr(0.1, 256, 32, 256, LRRule.none) == pytest.approx(0.1)


def test_iters_per_epoch_drops_last_incomplete_minibatch():
    assert iters_per_epoch(1_281_167, 256, 32) == 156  # ImageNet at 8k
    assert iters_per_epoch(100, 3, 10) == 3


def expected_lr(t, base, peak, ipe, warmup, warmup_epochs, milestones, gamma=0.1):
    """The issue's formula, written out independently of rules.lr_at."""
    T = round(warmup_epochs * ipe)
    if warmup == "gradual" and t < T:
        return base + (peak - base) * t / T
    if warmup == "constant" and t < T:
        return base
    return peak * gamma ** sum(t >= m * ipe for m in milestones)


@pytest.mark.parametrize("warmup", ["gradual", "constant", "none"])
def test_lr_at_every_iteration(warmup):
    ipe, peak = 7, 3.2
    for t in range(ipe * 12):
        got = lr_at(t, base_lr=0.1, peak=peak, iters_per_epoch=ipe, warmup=Warmup(warmup), warmup_epochs=5,
                    milestones=[6, 9], gamma=0.1)
        want = expected_lr(t, 0.1, peak, ipe, warmup, 5, [6, 9]) if warmup != "none" else expected_lr(
            t, 0.1, peak, ipe, "none", 0, [6, 9])
        assert got == pytest.approx(want, rel=1e-12), (warmup, t)


def test_gradual_warmup_starts_at_base_and_reaches_peak_at_T():
    ipe = 10
    kw = dict(base_lr=0.1, peak=3.2, iters_per_epoch=ipe, warmup=Warmup.gradual, warmup_epochs=5, milestones=[30])
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(49, **kw) == pytest.approx(0.1 + 3.1 * 49 / 50)
    assert lr_at(50, **kw) == pytest.approx(3.2)  # the schedule proper starts at t = T
    steps = [lr_at(t + 1, **kw) - lr_at(t, **kw) for t in range(49)]
    assert max(steps) == pytest.approx(min(steps))  # a constant amount every iteration


def test_constant_warmup_jumps_at_T():
    kw = dict(base_lr=0.1, peak=3.2, iters_per_epoch=10, warmup=Warmup.constant, warmup_epochs=5, milestones=[30])
    assert {lr_at(t, **kw) for t in range(50)} == {0.1}
    assert lr_at(50, **kw) == pytest.approx(3.2)


def test_small_minibatch_warmup_never_goes_above_its_peak():
    kw = dict(base_lr=0.1, peak=0.05, iters_per_epoch=10, warmup=Warmup.gradual, warmup_epochs=2, milestones=[5])
    assert all(lr_at(t, **kw) == pytest.approx(0.05) for t in range(50))


def test_step_decay_at_milestones():
    kw = dict(base_lr=0.1, peak=1.0, iters_per_epoch=4, warmup=Warmup.none, warmup_epochs=0, milestones=[30, 60, 80])
    assert lr_at(30 * 4 - 1, **kw) == pytest.approx(1.0)
    assert lr_at(30 * 4, **kw) == pytest.approx(0.1)
    assert lr_at(60 * 4, **kw) == pytest.approx(0.01)
    assert lr_at(80 * 4, **kw) == pytest.approx(0.001)


def test_remarks_formulas():
    assert loss_normaliser(8, 32) == 256  # Remark 3: kn, not n
    assert momentum_correction(0.2, 0.1) == pytest.approx(2.0)  # Remark 2


@pytest.mark.parametrize("warmup", ["gradual", pytest.param("constant", marks=pytest.mark.slow),  # a run each: the
                                    pytest.param("none", marks=pytest.mark.slow)])  # paper's stays fast
def test_run_uses_formula_rate_at_every_iteration(tmp_path, warmup):
    run = tmp_path / "run"
    proc = lbsgd("train", f"hydra.run.dir={run}", "threads=1", "log.progress=none", "log.every=1",
                 "log.tensorboard=false", "batch.k=8", "batch.n=16", "optim.ref_batch=32", "schedule.epochs=4",
                 "schedule.warmup_epochs=2", "schedule.milestones=[3]", f"schedule.warmup={warmup}")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in recs if "lr" in r]
    ipe = 1437 // 128
    assert len(iters) == 4 * ipe
    peak = 0.1 * 128 / 32  # kn = 4x the reference: warmup ramps 0.1 -> 0.4
    for r in iters:
        t = r["iter"] - 1  # the record is written after step t (counted from 0)
        assert r["lr"] == pytest.approx(expected_lr(t, 0.1, peak, ipe, warmup, 2, [3]), rel=1e-12)


@pytest.mark.parametrize("warmup", ["gradual", "none"])
def test_poly_and_cosine_decay_after_warmup(warmup):
    """Beyond the paper: poly (You et al. 2017) and cosine (Loshchilov & Hutter 2017) over the iterations
    after warmup, written out independently: peak*(1-p)**power and peak*(1+cos(pi p))/2, p = (t-T)/(total-T)."""
    ipe, epochs, peak = 7, 12, 3.2
    total = ipe * epochs
    T = 5 * ipe if warmup == "gradual" else 0
    for t in range(total):
        kw = dict(base_lr=0.1, peak=peak, iters_per_epoch=ipe, warmup=Warmup(warmup), warmup_epochs=5,
                  milestones=[6, 9], total_iters=total)
        poly = lr_at(t, decay=Decay.poly, power=2.0, **kw)
        cos = lr_at(t, decay=Decay.cosine, **kw)
        if t < T:  # warmup is the paper's, whatever follows it
            assert poly == cos == pytest.approx(expected_lr(t, 0.1, peak, ipe, warmup, 5, [6, 9]))
            continue
        p = (t - T) / (total - T)
        assert poly == pytest.approx(peak * (1 - p) ** 2, rel=1e-12), t
        assert cos == pytest.approx(peak * (1 + math.cos(math.pi * p)) / 2, rel=1e-12, abs=1e-15), t
    assert lr_at(T, decay=Decay.poly, **kw) == pytest.approx(peak)  # the decay starts at the peak
    assert lr_at(total, decay=Decay.poly, **kw) == 0.0  # and ends at 0
    assert lr_at(total + 5, decay=Decay.cosine, **kw) == pytest.approx(0.0, abs=1e-15)


def test_poly_power_one_is_linear_decay():
    kw = dict(base_lr=0.1, peak=1.0, iters_per_epoch=10, warmup=Warmup.none, warmup_epochs=0, milestones=[],
              decay=Decay.poly, total_iters=100, power=1.0)
    assert [lr_at(t, **kw) for t in (0, 25, 50, 99)] == pytest.approx([1.0, 0.75, 0.5, 0.01])


def test_decay_needs_iterations_after_warmup():
    with pytest.raises(ValueError, match="total_iters"):
        lr_at(60, base_lr=0.1, peak=1.0, iters_per_epoch=10, warmup=Warmup.gradual, warmup_epochs=5,
              milestones=[], decay=Decay.cosine, total_iters=50)


@pytest.mark.slow  # a training run
def test_run_uses_poly_decay_at_every_iteration(tmp_path):
    run = tmp_path / "run"
    proc = lbsgd("train", f"hydra.run.dir={run}", "threads=1", "log.progress=none", "log.every=1",
                 "log.tensorboard=false", "batch.k=8", "batch.n=16", "optim.ref_batch=32", "schedule.epochs=4",
                 "schedule.warmup_epochs=1", "schedule.decay=poly", "schedule.poly_power=2")
    assert proc.returncode == 0, proc.stderr
    iters = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    ipe, peak = 1437 // 128, 0.4
    for r in iters:
        t = r["iter"] - 1
        want = 0.1 + (peak - 0.1) * t / ipe if t < ipe else peak * (1 - (t - ipe) / (3 * ipe)) ** 2
        assert r["lr"] == pytest.approx(want, rel=1e-12), t


@pytest.mark.parametrize("overrides, key", [
    (["schedule.decay=poly", "schedule.poly_power=0"], "schedule.poly_power"),
    (["schedule.decay=cosine", "schedule.epochs=5", "schedule.warmup_epochs=5"], "schedule.warmup_epochs"),
])
def test_decay_settings_are_validated(tmp_path, overrides, key):
    proc = lbsgd("train", f"hydra.run.dir={tmp_path / 'run'}", "log.progress=none", *overrides)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr


def test_milestones_inside_warmup_are_fine_without_step_decay():
    """Milestones belong to decay=step: a 15-epoch warmup under poly decay is not refused by them."""
    validate(compose("train", ["schedule.decay=poly", "schedule.warmup_epochs=15", "schedule.epochs=20"]))
    with pytest.raises(UserError, match="schedule.milestones"):
        validate(compose("train", ["schedule.decay=step", "schedule.warmup_epochs=15", "schedule.epochs=20",
                                   "schedule.milestones=[10]"]))
