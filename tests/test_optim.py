"""Parameter groups (§5.1) and the two momentum forms of Remark 2."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lbsgd_cli.choices import Warmup
from lbsgd_cli.config import OptimConfig
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import PaperSGD, build_optimizer, param_groups, set_lr
from lbsgd_cli.rules import lr_at


def _model():
    cfg = OmegaConf.create({"arch": "cifar_resnet", "depth": 8, "width": 32, "zero_init_residual": True,
                            "bn_momentum": 0.1, "bn_eps": 1e-5, "fc_init_std": 0.01})
    return build_model(cfg, num_classes=10, in_channels=3, bn_group=None)


def test_no_weight_decay_on_bn_gamma_beta():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, 1e-4)}
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert not bn_params & decayed
    assert bn_params == {id(p) for p in groups["no_decay"]["params"]}
    assert id(model.fc.bias) in decayed and id(model.fc.weight) in decayed
    assert all(id(m.weight) in decayed for m in model.modules() if isinstance(m, nn.Conv2d))
    assert len(decayed) + len(bn_params) == len(list(model.parameters()))


def test_bias_decay_is_configurable():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, 1e-4, bias_weight_decay=False)}
    assert id(model.fc.bias) in {id(p) for p in groups["no_decay"]["params"]}


def _train(form: str, correction: bool = True, nesterov: bool = False, steps: int = 30):
    """A few SGD steps through gradual warmup and a rate drop on a fixed problem."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    ocfg = OmegaConf.structured(OptimConfig(momentum_form=form, momentum_correction=correction, nesterov=nesterov,
                                            weight_decay=1e-3))
    opt = build_optimizer(net, ocfg, lr=0.1)
    for t in range(steps):
        set_lr(opt, lr_at(t, base_lr=0.1, peak=0.8, iters_per_epoch=4, warmup=Warmup.gradual, warmup_epochs=2,
                          milestones=[5], gamma=0.1))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[t % 4 * 16 : (t % 4 + 1) * 16]), y[t % 4 * 16 : (t % 4 + 1) * 16]).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_paper_form_with_correction_equals_pytorch_form():
    assert isinstance(build_optimizer(nn.Linear(2, 2), OmegaConf.structured(OptimConfig(momentum_form="paper")), 0.1),
                      PaperSGD)
    for nesterov in (False, True):
        torch.testing.assert_close(_train("paper", True, nesterov), _train("pytorch", True, nesterov),
                                   rtol=0, atol=1e-12)


def test_paper_form_without_correction_differs():
    diff = (_train("paper", correction=False) - _train("pytorch")).abs().max()
    assert diff > 1e-4


# --------------------------------------------------------------------------- LARS (You et al. 2017, beyond the paper)


def _lars_net():
    """Linear(2, 2) then BatchNorm1d(2), with round weights: |W| = 5."""
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        net[0].bias.copy_(torch.tensor([1.0, -1.0]))
        net[1].weight.fill_(1.0)
        net[1].bias.zero_()
    return net


def _set_grads(net) -> None:
    net[0].weight.grad = torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64)  # |g| = 1
    net[0].bias.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    net[1].weight.grad = torch.tensor([0.2, -0.2], dtype=torch.float64)
    net[1].bias.grad = torch.tensor([0.1, 0.0], dtype=torch.float64)


def test_lars_step_equals_hand_computed_update():
    from lbsgd_cli.optim import LARS

    net = _lars_net()
    ocfg = OmegaConf.structured(OptimConfig(name="lars", lars_eta=0.01, weight_decay=0.1, momentum=0.9))
    opt = build_optimizer(net, ocfg, lr=2.0)
    assert isinstance(opt, LARS)
    assert sorted((g["name"], g["trust"], len(g["params"])) for g in opt.param_groups) == [
        ("decay", False, 1), ("decay_lars", True, 1), ("no_decay", False, 2)]
    _set_grads(net)
    opt.step()
    # W: local lr = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; d = (g + 0.1 W) / 30 = diag(0.9, 1.2) / 30; W - 2 d
    expected_w = torch.tensor([[3 - 2 * 0.03, 0.0], [0.0, 4 - 2 * 0.04]], dtype=torch.float64)
    torch.testing.assert_close(net[0].weight.detach(), expected_w, rtol=0, atol=1e-12)
    # bias (decayed, 1-D) and BN gamma/beta (not decayed): plain SGD, w - lr * (g + wd w)
    torch.testing.assert_close(net[0].bias.detach(), torch.tensor([1 - 2 * 0.6, -1 - 2 * 0.4], dtype=torch.float64))
    torch.testing.assert_close(net[1].weight.detach(), torch.tensor([0.6, 1.4], dtype=torch.float64))
    torch.testing.assert_close(net[1].bias.detach(), torch.tensor([-0.2, 0.0], dtype=torch.float64))
    # second step, same gradient: momentum v = 0.9 v + local_lr * (g + 0.1 W), local lr from the new |W| = 4.9
    _set_grads(net)
    opt.step()
    w1 = expected_w
    ratio = 0.01 * 4.9 / (1.0 + 0.1 * 4.9)
    v = 0.9 * torch.diag(torch.tensor([0.03, 0.04], dtype=torch.float64)) + ratio * (
        torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64) + 0.1 * w1)
    torch.testing.assert_close(net[0].weight.detach(), w1 - 2.0 * v, rtol=0, atol=1e-12)


def test_lars_gives_bn_and_bias_the_plain_sgd_update_and_scales_weights():
    """Over steps with momentum and random gradients: BN and bias parameters follow torch's SGD exactly,
    conv/linear weights do not (their step is |w|-relative)."""
    torch.manual_seed(0)
    nets = [_model().double(), _model().double()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [build_optimizer(nets[0], OmegaConf.structured(OptimConfig(name="lars")), 0.5),
            build_optimizer(nets[1], OmegaConf.structured(OptimConfig(name="sgd")), 0.5)]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in nets[0].parameters()]
        for net, opt in zip(nets, opts):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    plain = {id(p) for m in nets[0].modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    plain.add(id(nets[0].fc.bias))
    for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
        if id(p0) in plain:
            torch.testing.assert_close(p0, p1, rtol=0, atol=1e-12)
        else:
            assert p0.ndim > 1 and (p0 - p1).abs().max() > 1e-3


def test_lars_and_beyond_keys_are_validated():
    from lbsgd_cli.config import TrainConfig
    from lbsgd_cli.validation import validate
    from lbsgd_cli.errors import UserError

    def cfg(**over):
        c = OmegaConf.structured(TrainConfig)
        c.model.arch, c.data.name = "small_cnn", "digits"
        for key, value in over.items():
            OmegaConf.update(c, key, value)
        return c

    validate(cfg(**{"optim.name": "lars", "dist.comm_hook": "powersgd", "dist.powersgd_rank": 4}))
    for over, needle in (({"optim.lars_eta": 0.0}, "optim.lars_eta: must be a positive"),
                         ({"optim.name": "lars", "optim.momentum_form": "paper"}, "optim.momentum_form: lars"),
                         ({"dist.powersgd_rank": 0}, "dist.powersgd_rank: must be a positive"),
                         ({"dist.powersgd_start_iter": 1}, "dist.powersgd_start_iter: must be >= 2"),
                         ({"dist.comm_hook": "fp16", "memory.fsdp": True}, "dist.comm_hook: is a DDP"),
                         ({"log.noise_scale": True}, "log.noise_scale: needs >= 2 forward passes"),
                         ({"log.noise_scale": True, "batch.workers_per_pass": 4}, "log.noise_scale: needs")):
        with pytest.raises(UserError, match="^" + needle.replace("(", r"\(")) as e:
            validate(cfg(**over))
        assert "\n" not in str(e.value)
    validate(cfg(**{"log.noise_scale": True, "batch.workers_per_pass": 2}))


def test_optim_lars_group_composes_and_optim_name_is_refused():
    from .conftest import compose, lbsgd

    o = compose("train", ["optim=lars", "optim.lars_eta=0.02"]).optim
    assert (o.name, o.lars_eta, o.momentum, o.weight_decay, o.bn_weight_decay) == ("lars", 0.02, 0.9, 1e-4, False)
    assert o.base_lr == 10.0  # the trust ratio shrinks steps by ~eta: LARS's global rate is far above SGD's
    assert compose("train", ["optim=sgd"]).optim.base_lr == 0.1
    proc = lbsgd("train", "threads=1", "optim.name=lars")  # one way in: the group, which also sets base_lr
    assert proc.returncode == 2 and proc.stderr == (
        "lbsgd: error: optim.name: choose the optimizer with its group, optim=sgd or optim=lars "
        "(the group also sets its base_lr)\n")
    proc = lbsgd("train", "threads=1", "optim=adam")
    assert proc.returncode == 2 and proc.stderr.startswith("lbsgd: error: unknown config choice 'optim/adam'")


# --------------------------------------------------------------------------- multi-tensor steps against the former loops
#
# PaperSGD and LARS step with torch._foreach_* ops; the functions below are their former per-parameter
# loops, kept as the reference.


def _paper_sgd_loop(groups, state, correction=True):
    from lbsgd_cli.rules import momentum_correction

    for group in groups:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        prev_lr = group.get("prev_lr", lr)
        scale = momentum_correction(lr, prev_lr) if correction else 1.0
        group["prev_lr"] = lr
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            st = state.setdefault(id(p), {})
            if "momentum_buffer" not in st:
                u = st["momentum_buffer"] = g.mul(lr)
            else:
                u = st["momentum_buffer"]
                u.mul_(m * scale).add_(g, alpha=lr)
            if group["nesterov"]:
                p.sub_(u, alpha=m).sub_(g, alpha=lr)
            else:
                p.sub_(u)


def _lars_loop(groups, state):
    for group in groups:
        lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            d = g if wd == 0 else g.add(p, alpha=wd)
            if group["trust"]:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                ratio = eta * w_norm / (g_norm + wd * w_norm)
                d = d.mul(torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)))
            if m != 0:
                st = state.setdefault(id(p), {})
                if "momentum_buffer" not in st:
                    buf = st["momentum_buffer"] = d.clone()
                else:
                    buf = st["momentum_buffer"].mul_(m).add_(d)
                d = d.add(buf, alpha=m) if group["nesterov"] else buf
            p.sub_(d, alpha=lr)


def _random_params():
    """Weights, biases, a zero tensor (LARS: |w| = 0) and a parameter without a gradient, in float64."""
    torch.manual_seed(3)
    shapes = [(4, 3, 3, 3), (4,), (10, 4), (10,), (5, 5), (7,)]
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ps[4].zero_()
    return ps


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", [False, True])
def test_paper_sgd_foreach_step_equals_per_parameter_loop(nesterov, correction):
    ps_new, ps_ref = _random_params(), _random_params()
    opt = PaperSGD([{"params": ps_new[:2], "weight_decay": 1e-3}, {"params": ps_new[2:], "weight_decay": 0.0}],
                   lr=0.1, momentum=0.9, nesterov=nesterov, correction=correction)
    ref_groups = [{**g, "params": ref} for g, ref in zip(opt.param_groups, (ps_ref[:2], ps_ref[2:]))]
    state: dict = {}
    for step, lr in enumerate([0.1, 0.2, 0.4, 0.4, 0.04, 0.04]):  # warmup, constant, a drop: Remark 2's correction
        for g in (*opt.param_groups, *ref_groups):
            g["lr"] = lr
        grads = [torch.randn_like(p) for p in ps_new]
        for i, (a, b) in enumerate(zip(ps_new, ps_ref)):
            a.grad, b.grad = (None, None) if i == 5 and step < 3 else (grads[i].clone(), grads[i].clone())
        opt.step()
        _paper_sgd_loop(ref_groups, state, correction)
        for a, b in zip(ps_new, ps_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit for bit
            assert torch.equal(a.grad, b.grad) if a.grad is not None else b.grad is None  # gradients left alone


@pytest.mark.parametrize(("nesterov", "momentum"), [(False, 0.0), (False, 0.9), (True, 0.9)])  # nesterov needs m > 0
def test_lars_foreach_step_equals_per_parameter_loop(nesterov, momentum):
    from lbsgd_cli.optim import LARS

    ps_new, ps_ref = _random_params(), _random_params()
    # decayed weights with the trust ratio, a decayed plain group, an undecayed trust group holding the zero
    # tensor (|w| = 0: local rate 1), an undecayed plain group
    spec = [(slice(0, 1), 1e-4, True), (slice(1, 2), 1e-4, False), (slice(2, 5), 0.0, True), (slice(5, 6), 0.0, False)]
    groups = [{"params": ps_new[s], "weight_decay": wd, "trust": t} for s, wd, t in spec]
    opt = LARS(groups, lr=0.5, momentum=momentum, nesterov=nesterov, eta=0.01)
    ref_groups = [{**g, "params": ps_ref[s]} for g, (s, _, _) in zip(opt.param_groups, spec)]
    state: dict = {}
    for step in range(5):
        grads = [torch.randn_like(p) for p in ps_new]
        if step == 1:
            grads[0].zero_()  # |g| = 0: local rate 1
        for i, (a, b) in enumerate(zip(ps_new, ps_ref)):
            a.grad, b.grad = (None, None) if i == 5 and step < 2 else (grads[i].clone(), grads[i].clone())
        opt.step()
        _lars_loop(ref_groups, state)
        for a, b in zip(ps_new, ps_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit for bit
            assert torch.equal(a.grad, b.grad) if a.grad is not None else b.grad is None
