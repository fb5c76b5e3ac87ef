"""Networks and §5.1 initialisation: He init, FC ~ N(0, 0.01^2), zero-gamma, ghost BN."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lbsgd_cli.errors import UserError
from lbsgd_cli.ghost_bn import GhostBatchNorm2d
from lbsgd_cli.models import (CifarResNet, build_model, configured_dead_channels, residual_last_bns,
                               zero_gamma_dead_channels, zero_gamma_dead_warning)


def mcfg(arch, **kw):
    base = {"arch": arch, "depth": 20, "width": 32, "zero_init_residual": True, "bn_momentum": 0.1,
            "bn_eps": 1e-5, "fc_init_std": 0.01}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("depth,blocks", [(8, 3), (20, 9), (56, 27)])
def test_cifar_resnet_depths(depth, blocks):
    net = CifarResNet(depth, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6m+2 weighted layers: convs + the FC
    assert len(residual_last_bns(net)) == blocks
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_zero_gamma_on_each_residual_blocks_last_bn():
    net = build_model(mcfg("cifar_resnet"), 10, 3, bn_group=None)
    last = {id(b) for b in residual_last_bns(net)}
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            expected = 0.0 if id(m) in last else 1.0
            assert torch.all(m.weight == expected)
            assert torch.all(m.bias == 0)
    off = build_model(mcfg("cifar_resnet", zero_init_residual=False), 10, 3, bn_group=None)
    assert all(torch.all(b.weight == 1) for b in residual_last_bns(off))


def test_shortcut_a_pads_the_new_channels_with_zeros_at_zero_gamma():
    """Option A with gamma = 0: a stage's first block passes its input subsampled, the new half all zero."""
    net = build_model(mcfg("cifar_resnet", depth=8), 10, 3, bn_group=None).eval()
    block = net.layer2[0]
    x = torch.rand(2, 16, 8, 8)
    out = block(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 4, 4)) and torch.equal(out[:, 24:], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])


def test_shortcut_b_is_a_strided_1x1_projection_with_its_own_bn_that_zero_gamma_leaves_alone():
    a = build_model(mcfg("cifar_resnet", depth=8), 10, 3, bn_group=None)
    b = build_model(mcfg("cifar_resnet", depth=8, shortcut="B"), 10, 3, bn_group=None)
    # two projections (stages 2 and 3): 32*16 + 64*32 conv weights and 2*(32+64) BN parameters more than A
    extra = sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters())
    assert extra == 32 * 16 + 64 * 32 + 2 * (32 + 64)
    assert b.layer1[0].proj is None and b.layer2[0].proj is not None and b.layer3[0].proj is not None
    conv, bn = b.layer2[0].proj
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and torch.all(bn.weight == 1)
    assert all(torch.all(m.weight == 0) for m in residual_last_bns(b))  # zero-gamma: the residual branch only
    block = b.layer2[0].eval()
    x = torch.rand(2, 16, 8, 8)
    # at gamma = 0 the block is relu(BN(conv1x1(x))): no channel is zero by construction
    assert torch.allclose(block(x), torch.relu(block.proj(x)))
    ghost = build_model(mcfg("cifar_resnet", depth=8, shortcut="B"), 10, 3, bn_group=4)
    assert isinstance(ghost.layer2[0].proj[1], GhostBatchNorm2d)  # ghost BN over n there too


def test_resnet50_zero_gamma_targets_bottleneck_bn3():
    net = build_model(mcfg("resnet50"), 10, 3, bn_group=32)
    bns = residual_last_bns(net)
    assert len(bns) == 16 and all(torch.all(b.weight == 0) for b in bns)
    assert all(isinstance(m, GhostBatchNorm2d) and m.group_size == 32
               for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_he_init_and_fc_init():
    torch.manual_seed(0)
    net = build_model(mcfg("resnet50"), 1000, 3, bn_group=None)
    conv = net.layer3[0].conv2  # 256 -> 256, 3x3: He (fan_out) std = sqrt(2 / (256*9))
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert net.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert net.fc.weight.mean().abs().item() < 1e-3 and torch.all(net.fc.bias == 0)


@pytest.mark.parametrize("arch", ["small_cnn", "cifar_resnet"])
def test_bn_momentum_reaches_every_bn(arch):
    """model.bn_momentum is PyTorch's convention (the paper's 0.9 is 0.1 here): a non-default value must
    reach every BN layer, or a wrong default could hide behind PyTorch's own 0.1."""
    net = build_model(mcfg(arch, bn_momentum=0.25, bn_eps=1e-3), 10, 3, bn_group=8)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.25 and m.eps == 1e-3 for m in bns)


def test_any_torchvision_classifier_by_name():
    net = build_model(mcfg("resnet18"), 7, 3, bn_group=None)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(UserError, match="unknown network"):
        build_model(mcfg("resnet51"), 10, 3, bn_group=None)


def test_an_unknown_network_is_named_so_before_its_input_channels_are_looked_at():
    with pytest.raises(UserError, match=r"^model.arch: unknown network 'foo' \(small_cnn, cifar_resnet or a"):
        build_model(mcfg("foo"), 10, 1, bn_group=None)  # digits: one channel
    with pytest.raises(UserError, match="resnet18 expects RGB images, the data has 1 channel"):
        build_model(mcfg("resnet18"), 10, 1, bn_group=None)


def test_cifar_stem_makes_torchvision_resnet18_a_32x32_network():
    """model.stem=cifar: one 3x3/1 conv, no max pool (the CIFAR-100 replication's ResNet-18); He init and zero-gamma
    still reach it, and the imagenet stem stays torchvision's."""
    net = build_model(mcfg("resnet18", stem="cifar"), 100, 3, bn_group=16)
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(net.maxpool, nn.Identity)
    assert net.conv1.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.15)  # He, fan_out
    assert len(residual_last_bns(net)) == 8 and all(torch.all(b.weight == 0) for b in residual_last_bns(net))
    x = torch.randn(16, 3, 32, 32)
    feats = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    assert feats.shape == (16, 512, 4, 4) and net(x).shape == (16, 100)  # 32 -> 4, not 32 -> 1
    plain = build_model(mcfg("resnet18"), 100, 3, bn_group=None)
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)
    with pytest.raises(UserError, match="model.stem: cifar needs a torchvision ResNet"):
        build_model(mcfg("vgg11", stem="cifar"), 10, 3, bn_group=None)


@pytest.mark.parametrize("depth", [8, 20])
def test_zero_gamma_with_option_a_leaves_the_padded_channels_dead_for_good_and_projections_do_not(depth):
    """Table 2b's cause here (issue 36): a padded channel's ReLU input starts at exactly 0, whose gradient is 0, so
    its BN never moves; the next stage carries it on. Counted from the weights, and checked by training."""
    torch.manual_seed(0)
    a = build_model(mcfg("cifar_resnet", depth=depth), 10, 3, bn_group=None)
    assert zero_gamma_dead_channels(a) == {"layer2": (16, 32), "layer3": (48, 64)}  # 16 of 64 features left
    assert configured_dead_channels(mcfg("cifar_resnet", depth=depth)) == zero_gamma_dead_channels(a)  # the header's
    warning = zero_gamma_dead_warning(zero_gamma_dead_channels(a))
    assert "16 of 32 channels of layer2, 48 of 64 channels of layer3" in warning and "model.shortcut=B" in warning
    for other in (mcfg("cifar_resnet", depth=depth, shortcut="B"), mcfg("cifar_resnet", depth=depth,
                                                                          zero_init_residual=False)):
        net = build_model(other, 10, 3, bn_group=None)
        assert zero_gamma_dead_channels(net) == {} == configured_dead_channels(other)
        assert zero_gamma_dead_warning({}) is None
    assert configured_dead_channels(mcfg("resnet50")) == {}
    assert zero_gamma_dead_channels(build_model(mcfg("resnet18"), 10, 3, bn_group=None)) == {}  # projections

    # train: the dead channels' BNs get no gradient and every stage output keeps exactly the counted channels at 0
    b = build_model(mcfg("cifar_resnet", depth=depth, shortcut="B"), 10, 3, bn_group=None)
    outputs: dict[str, torch.Tensor] = {}
    for name in ("layer2", "layer3"):
        getattr(a, name).register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
    for net in (a, b):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    first = a.layer2[0].bn2
    padded = torch.tensor([c < 8 or c >= 24 for c in range(32)])
    assert torch.all(first.weight[padded] == 0) and torch.all(first.bias[padded] == 0)  # never moved
    assert torch.all(first.weight[~padded] != 0)  # the channels with an input did
    assert zero_gamma_dead_channels(a) == {"layer2": (16, 32), "layer3": (48, 64)}
    dead_outputs = {name: int((out == 0).all(dim=(0, 2, 3)).sum()) for name, out in outputs.items()}
    assert dead_outputs == {"layer2": 16, "layer3": 48}
    assert all(torch.all(bn.weight != 0) for bn in residual_last_bns(b))  # with projections every gamma moved
