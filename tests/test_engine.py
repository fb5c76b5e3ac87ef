"""The engine: one SGD step over passes of workers (§2, §2.3, §3) and evaluation over given batches."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, StepResult, evaluate, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer


def _net(n: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.structured(ModelConfig(arch="small_cnn", width=8)), 10, 1, bn_group=n).train()


def _batch(count: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(count, 1, 8, 8, generator=g), torch.randint(0, 10, (count,), generator=g)


def test_step_plan_is_frozen_and_counts_passes():
    plan = StepPlan(per_process=4, per_pass=3, n=4, loss_scale=1 / 16)
    assert plan.passes == 2 and StepPlan(4, 0, 4, 1.0).passes == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.n = 8  # type: ignore[misc]


def test_passes_of_workers_give_the_step_of_one_pass():
    """Ghost BN normalises each worker's n on its own, so running the 4 workers 1, 2 or 4 at a time is the
    same step: same summed loss and hits, the same weights and BN running statistics up to rounding."""
    x, y = _batch()
    results, states = [], []
    for per_pass in (4, 2, 1):
        net = _net()
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
        res = train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=per_pass, n=4, loss_scale=1 / 16))
        results.append(res)
        states.append(copy.deepcopy(net.state_dict()))
    assert all(isinstance(r, StepResult) and r.correct == results[0].correct for r in results)
    assert all(r.loss_sum == pytest.approx(results[0].loss_sum, rel=1e-6) for r in results)
    for s in states[1:]:
        for k, v in s.items():
            torch.testing.assert_close(v, states[0][k], rtol=1e-5, atol=1e-6)
    before = _net().state_dict()
    assert not torch.equal(before["fc.weight"], states[0]["fc.weight"])  # the step did change the weights


def test_bf16_step_keeps_weights_and_gradients_fp32():
    x, y = _batch()
    net = _net()
    opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
    res = train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=4, n=4, loss_scale=1 / 16,
                                                 precision="bf16"))
    assert res.loss_sum > 0
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())


def test_evaluate_counts_labelled_batches_and_reduces_once():
    net = _net().eval()
    x, y = _batch(12)
    calls = []

    def reduce(sums):
        calls.append(dict(sums))
        return sums

    plain = evaluate(net, [(x[:5], y[:5]), (x[5:], y[5:])])
    padded = evaluate(net, [(x[:5], y[:5]), (x[5:], y[5:]), (x[:1], None)], reduce)  # a padding forward
    assert plain == padded and plain["images"] == 12 and len(calls) == 1 and calls[0]["count"] == 12
    logits = net(x)
    assert plain["top1_err"] == pytest.approx(1 - (logits.argmax(1) == y).float().mean().item())
    assert plain["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert not net.training  # evaluation leaves the mode it found


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_reads_nothing_back_from_the_device(monkeypatch, precision):
    """A proxy on CPU for "no host sync per step": train_step and the loop's per-step bookkeeping (the
    divergence flag) never turn a tensor into a Python number or truth value. (fp16's GradScaler.step
    reads its inf flag once per step: torch's own sync.)"""
    from lbsgd_cli.divergence import DivergenceWatch

    x, y = _batch()
    net = _net()
    opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
    plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16, precision=precision)
    watch = DivergenceWatch(torch.device("cpu"))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    res = train_step(net, opt, (x, y), plan)
    watch.update(res.loss, 0)
    monkeypatch.undo()
    assert res.loss_sum > 0 and 0 <= res.correct <= 16
