"""Activation checkpointing per ResNet stage (lbsgd_cli/stage_checkpointing.py): the same weights and BN
statistics as plain training, the same state-dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import ModelConfig, OptimConfig
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.errors import UserError
from lbsgd_cli.models import build_model, stage_names
from lbsgd_cli.optim import build_optimizer
from lbsgd_cli.stage_checkpointing import CheckpointedStage, enable_stage_checkpointing


def _resnet8():
    cfg = OmegaConf.structured(ModelConfig)
    cfg.arch, cfg.depth, cfg.zero_init_residual = "cifar_resnet", 8, False
    return cfg


def test_stage_checkpointing_trains_to_the_same_weights_and_bn_buffers():
    plain = build_model(_resnet8(), 10, 3, bn_group=4)
    ckpt = enable_stage_checkpointing(copy.deepcopy(plain))
    assert isinstance(ckpt.layer2, CheckpointedStage) and ckpt.state_dict().keys() == plain.state_dict().keys()
    opt = OmegaConf.structured(OptimConfig)
    oa, ob = build_optimizer(plain, opt, 0.1), build_optimizer(ckpt, opt, 0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # two passes of two workers per step, as batch.workers_per_pass=2 does
        x, y = torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
        plan = StepPlan(per_process=4, per_pass=2, n=4, loss_scale=1 / 16)
        assert train_step(plain, oa, (x, y), plan) == train_step(ckpt, ob, (x, y), plan)
    a, b = plain.state_dict(), ckpt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, running mean/var, num_batches_tracked


def test_recomputation_does_not_update_running_stats_a_second_time():
    import torchvision

    plain = torchvision.models.resnet18(num_classes=4)
    ckpt = enable_stage_checkpointing(copy.deepcopy(plain))
    x = torch.randn(2, 3, 32, 32)
    plain(x).sum().backward()  # no deferral: plain BatchNorm2d updates in the forward itself
    ckpt(x).sum().backward()  # the backward recomputes layer1..layer4 in train mode
    a, b = plain.state_dict(), ckpt.state_dict()
    assert int(b["layer3.0.bn1.num_batches_tracked"]) == 1
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), ckpt.parameters()))


def test_only_the_resnet_stages_are_wrapped_and_a_network_without_them_is_refused():
    model = enable_stage_checkpointing(build_model(_resnet8(), 10, 3, bn_group=None))
    assert stage_names(model) == ["layer1", "layer2", "layer3"]
    assert all(isinstance(getattr(model, name), CheckpointedStage) for name in stage_names(model))
    cnn = OmegaConf.structured(ModelConfig)
    cnn.arch = "small_cnn"
    with pytest.raises(UserError, match="memory.checkpointing: SmallCNN has no ResNet stages"):
        enable_stage_checkpointing(build_model(cnn, 10, 3, bn_group=None))
