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

from .conftest import small_batch, small_net


def test_step_plan_is_frozen_and_counts_passes():
    plan = StepPlan(per_process=4, per_pass=3, n=4, loss_scale=1 / 16)
    assert plan.passes == 2 and StepPlan(4, 0, 4, 1.0).passes == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.n = 8  # type: ignore[misc]


def test_passes_of_workers_give_the_step_of_one_pass():
    """Ghost BN normalises each worker's n on its own, so running the 4 workers 1, 2 or 4 at a time is the
    same step: same summed loss and hits, the same weights and BN running statistics up to rounding."""
    x, y = small_batch()
    results, states = [], []
    for per_pass in (4, 2, 1):
        net = small_net()
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
        res = train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=per_pass, n=4, loss_scale=1 / 16))
        results.append(res)
        states.append(copy.deepcopy(net.state_dict()))
    assert all(isinstance(r, StepResult) and r.correct == results[0].correct for r in results)
    assert all(r.loss_sum == pytest.approx(results[0].loss_sum, rel=1e-6) for r in results)
    for s in states[1:]:
        for k, v in s.items():
            torch.testing.assert_close(v, states[0][k], rtol=1e-5, atol=1e-6)
    before = small_net().state_dict()
    assert not torch.equal(before["fc.weight"], states[0]["fc.weight"])  # the step did change the weights


def test_bf16_step_keeps_weights_and_gradients_fp32():
    x, y = small_batch()
    net = small_net()
    opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
    res = train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=4, n=4, loss_scale=1 / 16,
                                                 precision="bf16"))
    assert res.loss_sum > 0
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())


def test_evaluate_counts_labelled_batches_and_reduces_once():
    net = small_net().eval()
    x, y = small_batch(12)
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


def test_pass_workers_auto_is_cache_sized_on_a_cpu_and_one_pass_on_an_accelerator():
    from lbsgd_cli.engine import CPU_PASS_SAMPLES, pass_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    assert CPU_PASS_SAMPLES == 64
    assert pass_workers("auto", 32, 32, cpu) == 2  # 64 samples per pass
    assert pass_workers("auto", 32, 16, cpu) == 4 and pass_workers("auto", 6, 16, cpu) == 3  # a divisor of k/W
    assert pass_workers("auto", 5, 16, cpu) == 1 and pass_workers("auto", 8, 256, cpu) == 1  # at least one
    assert pass_workers("auto", 1, 32, cpu) == 1
    assert pass_workers("auto", 32, 32, gpu) == 32
    assert pass_workers(0, 32, 32, cpu) == 32 and pass_workers(4, 32, 32, cpu) == 4
    assert pass_workers(64, 32, 32, cpu) == 32


def test_auto_passes_give_the_weights_of_one_pass_within_float_roundoff():
    """The guarantee of README "Guarantee": the pass size changes only the order in which the workers'
    gradients are summed. After one step of a CIFAR ResNet-8 (8 workers of n = 8, auto = 8 passes of one
    worker here) the weights differ from one pass of all 8 by float32 roundoff, not more."""
    from lbsgd_cli.engine import pass_workers

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    per_pass = pass_workers("auto", 8, 8, torch.device("cpu"))
    assert per_pass == 8  # 64 samples fit one auto pass at n = 8 ...
    per_pass = pass_workers("auto", 8, 32, torch.device("cpu"))
    assert per_pass == 2  # ... at n = 32 two workers do; compare 1-worker passes, the farthest from one pass
    states = []
    for workers in (8, 1):
        torch.manual_seed(0)
        net = build_model(OmegaConf.structured(ModelConfig(arch="cifar_resnet", depth=8)), 10, 3, bn_group=8).train()
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.8)
        train_step(net, opt, (x, y), StepPlan(per_process=8, per_pass=workers, n=8, loss_scale=1 / 64))
        states.append(net.state_dict())
    worst = max(float((states[0][k].double() - states[1][k].double()).abs().max()) for k in states[0]
                if states[0][k].is_floating_point())
    assert 0 < worst < 1e-6  # float32 roundoff of gradient sums; the step itself moves weights by ~1e-2


@pytest.mark.slow  # the fused kernel compiles for every pass split
def test_fused_bn_kernel_gives_the_native_step_and_any_pass_split():
    """model.bn_kernel=fused: two steps over 1 and 4 passes give the native kernel's weights and running
    statistics within float32 roundoff, and the pass split does not change the fused result beyond it."""
    x, y = small_batch()
    states = {}
    for kernel in ("native", "fused"):
        for per_pass in (4, 1):
            net = small_net(bn_kernel=kernel)
            opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
            for _ in range(2):
                train_step(net, opt, (x, y), StepPlan(per_process=4, per_pass=per_pass, n=4, loss_scale=1 / 16))
            states[kernel, per_pass] = copy.deepcopy(net.state_dict())
    ref = states["native", 4]
    for key, state in states.items():
        for k, v in state.items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} {k}: {m}")
    assert not torch.equal(small_net().state_dict()["fc.weight"], states["fused", 4]["fc.weight"])


@pytest.mark.parametrize("bn_kernel", ["native", pytest.param("fused", marks=pytest.mark.slow)])  # fused compiles
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_reads_nothing_back_from_the_device(monkeypatch, precision, bn_kernel):
    """A proxy on CPU for "no host sync per step": train_step and the loop's per-step bookkeeping (the
    divergence flag) never turn a tensor into a Python number or truth value. (fp16's GradScaler.step
    reads its inf flag once per step: torch's own sync.)"""
    from lbsgd_cli.divergence import DivergenceWatch

    x, y = small_batch()
    net = small_net(bn_kernel=bn_kernel)
    opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
    plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16, precision=precision)
    watch = DivergenceWatch(torch.device("cpu"))
    if bn_kernel == "fused":  # compile first: torch.compile itself may read values while it traces
        train_step(copy.deepcopy(net), copy.deepcopy(opt), (x, y), plan)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    res = train_step(net, opt, (x, y), plan)
    watch.update(res.loss, 0)
    monkeypatch.undo()
    assert res.loss_sum > 0 and 0 <= res.correct <= 16
