"""Gradient noise scale (McCandlish et al. 2018): estimators, the training probe, the CLI key, recommend_kn."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from lbsgd_cli.noise_scale import EMA, NoiseScaleEstimator, NoiseScaleProbe, b_simple, g2_estimate, trace_estimate

from .conftest import ROOT, lbsgd


def test_estimators_on_tiny_tensors_match_hand_computation():
    g_small, g_big = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])  # |.|^2 = 5 and 2
    s, b = float(g_small.square().sum()), float(g_big.square().sum())
    # |G|^2 = (8*2 - 2*5) / (8 - 2) = 1;  tr(Sigma) = (5 - 2) / (1/2 - 1/8) = 8
    assert g2_estimate(s, b, 2, 8) == pytest.approx(1.0)
    assert trace_estimate(s, b, 2, 8) == pytest.approx(8.0)
    assert b_simple(8.0, 1.0) == 8.0 and b_simple(8.0, -0.1) == math.inf
    # consistency: E|g_B|^2 = |G|^2 + tr(Sigma)/B holds for both sizes with the estimates
    assert 1.0 + 8.0 / 2 == pytest.approx(s) and 1.0 + 8.0 / 8 == pytest.approx(b)


def test_ema_is_bias_corrected_and_ratio_is_taken_after_smoothing():
    e = EMA(0.5)
    assert math.isnan(e.value)
    e.update(4.0)
    assert e.value == 4.0  # one sample: itself
    e.update(2.0)
    assert e.value == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)
    est = NoiseScaleEstimator(2, 8, decay=0.5)
    est.update(5.0, 2.0)  # |G|^2 = 1, tr = 8
    est.update(9.0, 4.0)  # |G|^2 = (32 - 18)/6 = 7/3, tr = 5/0.375 = 40/3
    g2 = (0.25 * 1 + 0.5 * 7 / 3) / 0.75
    tr = (0.25 * 8 + 0.5 * 40 / 3) / 0.75
    r = est.result()
    assert r["train/noise_scale_G2"] == pytest.approx(g2) and r["train/noise_scale_trS"] == pytest.approx(tr)
    assert r["train/noise_scale"] == pytest.approx(tr / g2)  # ratio of the smoothed values, not mean of ratios
    assert NoiseScaleEstimator(2, 8).result(lambda v: [-1.0, 5.0])["train/noise_scale"] is None
    with pytest.raises(ValueError):
        NoiseScaleEstimator(8, 8)


def _regression_steps(probe_on: bool, steps: int, seed: int = 0, decay: float = 0.9995):
    """Linear regression y = x.w* + N(0, s^2), x ~ N(0, I_d), at a fixed w = w* + delta (lr 0), in the
    loop's form: k*n = 4 passes of 8, summed losses over k*n, one optimizer step per minibatch."""
    torch.manual_seed(seed)
    d, sigma, chunk, passes = 10, 1.0, 8, 4
    kn = chunk * passes
    w_star, delta = torch.randn(d), torch.randn(d)
    delta /= delta.norm()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = NoiseScaleProbe(model, opt, chunk, kn, grad_scale=kn / chunk, decay=decay) if probe_on else None
    grads = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(kn, d)
        y = x @ w_star + sigma * torch.randn(kn)
        for p in range(passes):
            xs, ys = x[p * chunk : (p + 1) * chunk], y[p * chunk : (p + 1) * chunk]
            (0.5 * (model(xs).squeeze(1) - ys).square().sum() / kn).backward()
        with torch.no_grad():
            model(x[:2])  # an evaluation forward between steps is not a pass
        grads.append(model.weight.grad.clone())
        opt.step()
    # per-sample gradient x (x.delta - eps): G = delta, Sigma = delta delta^T + (|delta|^2 + s^2) I
    true = {"G2": 1.0, "trS": 1.0 + d * (1.0 + sigma**2)}
    return probe, grads, true


@pytest.mark.slow  # many probe steps of a regression
def test_probe_recovers_known_noise_scale_of_linear_regression_and_is_read_only():
    probe, grads, true = _regression_steps(True, steps=2000)  # seeds 0-5: within 12%
    r = probe.result()
    expected = true["trS"] / true["G2"]  # = 21
    assert r["train/noise_scale"] == pytest.approx(expected, rel=0.2)
    assert r["train/noise_scale_trS"] == pytest.approx(true["trS"], rel=0.2)
    assert r["train/noise_scale_G2"] == pytest.approx(true["G2"], rel=0.2)
    _, plain, _ = _regression_steps(False, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(grads[:20], plain))  # the hooks change no gradient
    probe.remove()


def test_noise_scale_key_needs_two_passes_and_logs_records(tmp_path):
    bad = lbsgd("train", "threads=1", "log.noise_scale=true", "batch.k=4")
    assert bad.returncode == 2 and bad.stderr.startswith("lbsgd: error: log.noise_scale:"), bad.stderr
    assert bad.stderr.count("\n") == 1
    run = tmp_path / "run"
    proc = lbsgd("train", f"hydra.run.dir={run}", "threads=1", "log.progress=none", "log.tensorboard=false",
                   "schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.milestones=[1]", "batch.k=4",
                   "batch.n=32", "batch.workers_per_pass=1", "data.train_subset=512", "model.width=8",
                   "log.every=1", "log.noise_scale=true")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in recs if "iter" in r]
    assert len(iters) == 4
    for r in iters:
        assert r["train/noise_scale_trS"] > 0 and math.isfinite(r["train/noise_scale_G2"])
        assert r["train/noise_scale"] is None or r["train/noise_scale"] > 0


def _recommend_module():
    spec = importlib.util.spec_from_file_location("recommend_kn", ROOT / "scripts" / "experiments" / "recommend_kn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recommend_kn_on_a_fabricated_run(tmp_path, capsys):
    rk = _recommend_module()
    assert [rk.nearest_power_of_two(x) for x in (0.7, 3.0, 5.5, 6.0, 700.0, 725.0)] == [1, 4, 4, 8, 512, 1024]
    (tmp_path / "config.yaml").write_text("batch:\n  k: 8\n  n: 32\nschedule:\n  warmup: gradual\n  warmup_epochs: 2\n")
    lines = [{"step": i, "iter": i, "epoch": i / 10, "lr": 0.1, "train/loss": 1.0,
              "train/noise_scale": 10.0 if i < 20 else 300.0 + i} for i in range(1, 41)]
    lines[25]["train/noise_scale"] = None  # |G|^2 estimate not positive yet
    lines.append({"step": 40, "epoch": 4, "val/err": 0.3})  # an epoch record
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 41, "tr'  # a line cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    r = rk.recommend(tmp_path)  # warmup: epochs < 2 (iterations < 20) are left out; the null counts as inf
    assert r["records"] == 21 and r["unresolved"] == 1 and r["b_simple"] == 331.0 and r["recommended_kn"] == 256
    assert r["kn"] == 256
    rk.main([str(tmp_path), "--after-epoch", "0"])
    out = capsys.readouterr().out
    assert "recommended largest kn: 256" in out and "over 40 records" in out and "this run: kn = 256" in out
    assert "1 of them unresolved (inf)" in out
    with pytest.raises(SystemExit, match="no train/noise_scale"):
        rk.recommend(tmp_path, after_epoch=10)
    # the first epochs alone: [1, 2.5) holds iterations 10..24 (10 at 10.0, 5 at 300 + i)
    r = rk.recommend(tmp_path, after_epoch=1, before_epoch=2.5)
    assert r["records"] == 15 and r["b_simple"] == 10.0 and r["recommended_kn"] == 8
    # each epoch's median, the unusable record left out: how B_simple grows as the loss falls
    assert r["by_epoch"] == {0: (10.0, 9, 0), 1: (10.0, 10, 0), 2: (324.5, 10, 1), 3: (334.5, 10, 0), 4: (340.0, 1, 0)}
    rk.main([str(tmp_path), "--by-epoch"])
    assert "    2            324.5       10           1" in capsys.readouterr().out
    # late in training the |G|^2 estimate is mostly not positive: the median is inf, no recommendation
    for rec in lines[30:40]:
        rec["train/noise_scale"] = None
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = rk.recommend(tmp_path, after_epoch=3)
    assert r["b_simple"] == math.inf and r["unresolved"] == 10 and r["recommended_kn"] is None
    rk.main([str(tmp_path), "--after-epoch", "3"])
    assert "no recommendation" in capsys.readouterr().out
    # a flat warmup (kn <= ref_batch: it starts at the peak) is no warmup: epoch 1 on
    (tmp_path / "config.yaml").write_text("batch:\n  k: 4\n  n: 32\noptim:\n  ref_batch: 128\n"
                                          "schedule:\n  warmup: gradual\n  warmup_epochs: 5\n")
    assert rk.recommend(tmp_path)["after_epoch"] == 1.0
