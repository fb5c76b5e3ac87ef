"""Ghost BN (§2.3): BN over each worker's n samples, in one vectorised pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lbsgd_cli.ghost_bn import (
    GhostBatchNorm2d,
    convert_to_ghost_bn,
    deferred_running_stats,
    flush_running_stats,
)


def _pair(c=5, n=4, momentum=0.1):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    ghost = GhostBatchNorm2d(c, n, momentum=momentum)
    ghost.load_state_dict(ref.state_dict())
    return ref, ghost


def test_outputs_and_grads_equal_bn_per_group():
    ref, ghost = _pair()
    g, n = 3, 4
    x = torch.randn(g * n, 5, 6, 6) * 3 + 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ghost = ghost(x1)
    per_group = [copy.deepcopy(ref) for _ in range(g)]
    y_ref = torch.cat([per_group[i](x2[i * n : (i + 1) * n]) for i in range(g)])
    torch.testing.assert_close(y_ghost, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y_ref)
    (y_ghost * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    grad_w_ref = sum(m.weight.grad for m in per_group)
    torch.testing.assert_close(ghost.weight.grad, grad_w_ref, rtol=1e-4, atol=1e-5)


def test_running_stats_are_the_workers_average():
    """Each worker's BN updates its own running stats; the kept stats are their average."""
    ref, ghost = _pair()
    g, n = 4, 4
    x = torch.randn(g * n, 5, 3, 3) * 2 - 1
    ghost(x)
    workers = [copy.deepcopy(ref) for _ in range(g)]
    for i, m in enumerate(workers):
        m(x[i * n : (i + 1) * n])
    torch.testing.assert_close(ghost.running_mean, torch.stack([m.running_mean for m in workers]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m in workers]).mean(0))
    assert int(ghost.num_batches_tracked) == 1  # once per iteration, as each worker does


def test_single_group_is_plain_batchnorm():
    ref, ghost = _pair(n=8)
    x = torch.randn(8, 5, 4, 4)
    torch.testing.assert_close(ghost(x), ref(x))
    torch.testing.assert_close(ghost.running_var, ref.running_var)


def test_eval_mode_uses_running_stats():
    ref, ghost = _pair()
    ref.eval(), ghost.eval()
    x = torch.randn(6, 5, 4, 4)
    torch.testing.assert_close(ghost(x), ref(x))


def test_deferred_update_over_several_passes_equals_one_pass():
    _, one = _pair()
    _, split = _pair()
    x = torch.randn(16, 5, 3, 3)
    one(x)
    model = nn.Sequential(split)
    with deferred_running_stats(model) as layers:
        split(x[:8])
        split(x[8:])
        torch.testing.assert_close(split.running_mean, _pair()[1].running_mean)  # untouched until flushed
    flush_running_stats(layers)
    torch.testing.assert_close(split.running_mean, one.running_mean)
    torch.testing.assert_close(split.running_var, one.running_var)
    assert int(split.num_batches_tracked) == 1


def test_batch_not_multiple_of_n_is_an_error():
    _, ghost = _pair(n=4)
    with pytest.raises(ValueError, match="multiple of the BN batch"):
        ghost(torch.randn(6, 5, 2, 2))


def test_convert_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    net[1].running_mean.fill_(0.3)
    convert_to_ghost_bn(net, 2)
    assert isinstance(net[1], GhostBatchNorm2d) and isinstance(net[2][0], GhostBatchNorm2d)
    assert net[1].group_size == 2 and float(net[1].running_mean[0]) == pytest.approx(0.3)
