"""compile=true (issue 13 item 5): torch.compile of the model gives eager's step within float tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer


def _net(bn_kernel: str = "native") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(arch="small_cnn", width=8, bn_kernel=bn_kernel))
    return build_model(cfg, 10, 1, bn_group=4).train()


@pytest.mark.slow
@pytest.mark.parametrize("bn_kernel", ["native", "fused"])
def test_compiled_model_steps_like_eager(bn_kernel):
    """Two steps of the ghost-BN net over 2 passes of 2 workers, eager and compiled (in place: the same
    state dict keys): same weights and BN running statistics within float tolerance, same hits."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16)
    results = []
    for compiled in (False, True):
        net = _net(bn_kernel)
        if compiled:
            net.compile()
        opt = build_optimizer(net, OmegaConf.structured(OptimConfig()), lr=0.1)
        steps = [train_step(net, opt, (x, y), plan) for _ in range(2)]
        results.append((copy.deepcopy(net.state_dict()), [(s.loss_sum, s.correct) for s in steps]))
    (eager, eager_steps), (comp, comp_steps) = results
    assert eager.keys() == comp.keys()
    for k, v in eager.items():
        torch.testing.assert_close(comp[k], v, rtol=1e-4, atol=1e-5)
    assert [c for _, c in eager_steps] == [c for _, c in comp_steps]
    assert [l for l, _ in comp_steps] == pytest.approx([l for l, _ in eager_steps], rel=1e-5)
