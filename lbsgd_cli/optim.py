"""Optimizers and parameter groups (§3 Remark 2, §5.1).

``build_optimizer`` returns either PyTorch's SGD or :class:`PaperSGD`, the update
form of the paper's eq. (10) with the momentum correction, or (``optim.name=lars``,
beyond the paper) :class:`LARS`. All are driven by the same per-iteration rate from
:func:`lbsgd_cli.rules.lr_at`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .choices import MomentumForm
from .rules import momentum_correction


def param_groups(
    model: nn.Module, weight_decay: float, bn_weight_decay: bool = False, bias_weight_decay: bool = True
) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    §5.1: weight decay 1e-4 on weights, *not* on BN's gamma and beta. Biases of
    other layers (the final FC's) decay unless ``bias_weight_decay`` is false.
    """
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if is_norm:
                (decay if bn_weight_decay else no_decay).append(p)
            elif name == "bias":
                (decay if bias_weight_decay else no_decay).append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


class PaperSGD(torch.optim.Optimizer):
    """SGD in the form of the paper's eq. (10): ``u <- m*u + lr*(g + wd*w); w <- w - u``.

    With ``correction`` (Remark 2) ``u`` is first scaled by ``lr_new/lr_old`` whenever
    the rate changed since the last step, which makes it equal to PyTorch's form
    (``u = lr * v``) through warmup and rate drops. Nesterov: ``w <- w - (m*u + lr*g)``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        correction: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)
        self.correction = correction

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch API
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            prev_lr = group.get("prev_lr", lr)
            scale = momentum_correction(lr, prev_lr) if self.correction else 1.0
            group["prev_lr"] = lr
            params, grads = _with_grads(group)
            if not params:
                continue
            # One multi-tensor op per line (torch._foreach_*) instead of a Python loop over parameters.
            g = grads if wd == 0 else torch._foreach_add(grads, params, alpha=wd)
            u = _momentum_buffers(self.state, params, g, first=lambda d: torch._foreach_mul(d, lr),
                                  update=lambda bufs, d: (torch._foreach_mul_(bufs, m * scale),
                                                          torch._foreach_add_(bufs, d, alpha=lr)))
            if group["nesterov"]:
                torch._foreach_sub_(params, u, alpha=m)
                torch._foreach_sub_(params, g, alpha=lr)
            else:
                torch._foreach_sub_(params, u)
        return loss


def _with_grads(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The group's parameters that have a gradient, and their gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def _momentum_buffers(state: dict, params: list, d: list, first, update) -> list[torch.Tensor]:
    """Each parameter's momentum buffer after this step: ``first(d)`` for parameters without one
    (the first step), ``update(bufs, d)`` in place for the others; returned in ``params``' order."""
    new = [i for i, p in enumerate(params) if "momentum_buffer" not in state[p]]
    old = [i for i, p in enumerate(params) if "momentum_buffer" in state[p]]
    if old:
        update([state[params[i]]["momentum_buffer"] for i in old], [d[i] for i in old])
    if new:
        for i, buf in zip(new, first([d[i] for i in new])):
            state[params[i]]["momentum_buffer"] = buf
    return [state[p]["momentum_buffer"] for p in params]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017, Algorithm 1) in PyTorch's momentum form.

    For each parameter of a group with ``trust=True`` (conv/linear weights) the update direction
    ``d = g + wd*w`` is scaled by the local rate ``eta * |w| / (|g| + wd*|w|)`` (1 when ``|w|`` or
    ``|g|`` is 0), then ``v <- m*v + d; w <- w - lr*v`` as torch's SGD (first step ``v = d``;
    Nesterov ``w <- w - lr*(d + m*v)``). Groups with ``trust=False`` (BN gamma/beta, biases) take
    the plain SGD update. ``lr`` is the global rate of :func:`lbsgd_cli.rules.lr_at`.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, eta=eta, trust=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch API
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            params, grads = _with_grads(group)
            if not params:
                continue
            d = grads if wd == 0 else torch._foreach_add(grads, params, alpha=wd)
            if group["trust"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                ratio = eta * w_norm / (g_norm + wd * w_norm)
                local = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                d = torch._foreach_mul(d, list(local.unbind(0)))  # new tensors: p.grad is left as it is
            if m != 0:
                bufs = _momentum_buffers(self.state, params, d, first=lambda x: [t.clone() for t in x],
                                         update=lambda b, x: (torch._foreach_mul_(b, m), torch._foreach_add_(b, x)))
                d = torch._foreach_add(d, bufs, alpha=m) if group["nesterov"] else bufs
            torch._foreach_sub_(params, d, alpha=lr)
        return loss


def lars_groups(groups: list[dict]) -> list[dict]:
    """Split :func:`param_groups` for LARS: the decayed group's matrices and kernels (conv/linear weights,
    ``ndim > 1``) take the trust ratio; biases and BN parameters (1-D) and the non-decayed group do not."""
    out = []
    for g in groups:
        trusted = [p for p in g["params"] if g["name"] == "decay" and p.ndim > 1]
        plain = [p for p in g["params"] if not (g["name"] == "decay" and p.ndim > 1)]
        for params, trust, suffix in ((trusted, True, "_lars"), (plain, False, "")):
            if params:
                out.append({**g, "params": params, "trust": trust, "name": g["name"] + suffix})
    return out


def build_optimizer(model: nn.Module, ocfg, lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` and ``optim.momentum_form``; ``lr`` is the rate of iteration 0."""
    groups = param_groups(model, ocfg.weight_decay, ocfg.bn_weight_decay, ocfg.bias_weight_decay)
    if getattr(ocfg, "name", "sgd") == "lars":
        return LARS(lars_groups(groups), lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov, eta=ocfg.lars_eta)
    if MomentumForm(ocfg.momentum_form) == MomentumForm.paper:
        return PaperSGD(
            groups,
            lr=lr,
            momentum=ocfg.momentum,
            nesterov=ocfg.nesterov,
            correction=ocfg.momentum_correction,
        )
    return torch.optim.SGD(groups, lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
