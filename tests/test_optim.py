"""Parameter groups (§5.1) and the two momentum forms of Remark 2."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from lbsgd_cli.config import OptimConfig, Warmup
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
