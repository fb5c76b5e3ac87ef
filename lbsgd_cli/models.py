"""Networks and the paper's initialisation (§5.1).

- ``small_cnn``: a 3-conv BN network for the embedded 8x8 digits default.
- ``cifar_resnet``: He et al.'s CIFAR ResNet of depth 6m+2 (8, 20, 56, ...),
  16/32/64 channels, parameter-free (zero-padding, option A) shortcuts, or projections (option B:
  a strided 1x1 conv and its own BN, as ResNet-50's) with ``model.shortcut=B``.
- any torchvision classifier by name (``resnet50`` is the paper's network: the
  stride sits on the 3x3 conv).

:func:`build_model` applies He init to convs, N(0, 0.01^2) to the final FC,
zero-gamma to each residual block's last BN, and swaps BatchNorm2d for ghost BN
over ``n`` samples.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .choices import BUILTIN_NETWORKS
from .errors import UserError
from .ghost_bn import convert_to_ghost_bn


class SmallCNN(nn.Module):
    """conv-BN-ReLU x3 with a pool, global average pool, FC. ~40k parameters at width 32."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; ``bn2`` is the block's last BN (zero-gamma target).

    A block that changes shape adds its input through option A of He et al. (2016, §3.3), subsample and
    zero-pad the new channels, or through option B, ``proj``: a strided 1x1 conv and a BN that zero-gamma
    leaves at gamma = 1, as in ResNet-50's projection shortcuts."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin
        self.proj: nn.Sequential | None = None
        if shortcut == "B" and (stride > 1 or cout != cin):
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:  # option B
            return self.proj(x)
        # Option A: subsample and zero-pad the new channels.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """ResNet-(6m+2) for 32x32 images (He et al. 2016, §4.2)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        m = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            blocks = []
            for i in range(m):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, shortcut))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def residual_last_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BN of every residual block: ``bn3`` of a Bottleneck, ``bn2`` of a basic block."""
    # a torchvision network was built only if torchvision is imported (importing it costs ~5 s of CPU)
    tv = sys.modules.get("torchvision.models.resnet")
    tv_bottleneck, tv_basic = (tv.Bottleneck, tv.BasicBlock) if tv is not None else ((), ())

    found = []
    for mod in model.modules():
        if isinstance(mod, tv_bottleneck):
            found.append(mod.bn3)
        elif isinstance(mod, (tv_basic, BasicBlock)):
            found.append(mod.bn2)
    return found


def zero_gamma_dead_channels(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Channels of a CIFAR ResNet that zero-gamma (§5.1) with option-A shortcuts leaves at exactly 0 for good:
    stage name -> (dead channels, channels) of the stage's output, for the stages that have any.

    With option A a stage's first block adds its input zero-padded to the new channels; with zero-gamma that
    block's last BN starts at gamma = beta = 0, so a padded channel's ReLU input is exactly 0. ReLU's gradient
    at 0 is 0: that BN's gamma and beta, and the conv feeding it, never get a gradient, and the channel stays 0
    for the whole run. Every later block of the stage inherits it (its shortcut carries the 0, its branch starts
    at 0 too) and so does the next stage, whose shortcut carries the dead channels on beside its own padding:
    on ResNet-8/20, 16 of stage 2's 32 channels and 48 of stage 3's 64, so the classifier sees 16 of its 64
    features. Projection shortcuts (option B, ResNet-50's) pass every channel: none dies. Read from the
    network's weights (each block's last BN at gamma = beta = 0 per channel), so it holds at initialisation
    and for any checkpoint; empty for other networks.
    """
    if not isinstance(model, CifarResNet):
        return {}
    dead: set[int] = set()
    out: dict[str, tuple[int, int]] = {}
    for name in stage_names(model):
        for block in getattr(model, name):
            cout = block.bn2.num_features
            if block.proj is not None:  # option B: dead only where the projection's own BN is at 0 too
                shortcut_dead = _at_zero(block.proj[1])
            else:  # option A: the input's channels shifted by the front padding, and the padding itself
                front = block.extra // 2
                shortcut_dead = {c + front for c in dead} | set(range(front)) | set(range(cout - block.extra + front, cout))
            dead = shortcut_dead & _at_zero(block.bn2)
        if dead:
            out[name] = (len(dead), cout)
    return out


def _at_zero(bn: nn.Module) -> set[int]:
    """The channels of a BN whose gamma and beta are both exactly 0."""
    return set(torch.nonzero((bn.weight == 0) & (bn.bias == 0)).flatten().tolist())


def configured_dead_channels(mcfg) -> dict[str, tuple[int, int]]:
    """:func:`zero_gamma_dead_channels` of the network ``model.*`` configures, freshly initialised on the CPU.

    For the train header: the network being trained may be sharded (FSDP2's DTensors) or on a device, and
    only rank 0 prints; the count depends on the configuration alone (depth, shortcut, zero-gamma)."""
    if mcfg.arch != "cifar_resnet":
        return {}
    return zero_gamma_dead_channels(build_model(mcfg, 10, 3, None))


def zero_gamma_dead_warning(dead: dict[str, tuple[int, int]]) -> str | None:
    """The train header's line for the channels :func:`zero_gamma_dead_channels` found (``None`` for none)."""
    if not dead:
        return None
    where = ", ".join(f"{d} of {c} channels of {stage}" for stage, (d, c) in dead.items())
    return (f"warning: zero-gamma with option-A (zero-padded) shortcuts leaves {where} at exactly 0 for the whole run "
            "(ReLU's gradient at 0 is 0): use model.shortcut=B or model.zero_init_residual=false (results/README.md, "
            "Table 2b)")


def final_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def stage_names(model: nn.Module) -> list[str]:
    """The residual stages of a CIFAR or torchvision ResNet: ``layer1``, ``layer2``, ..."""
    return [f"layer{i}" for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Sequential)]


def init_weights(model: nn.Module, zero_init_residual: bool, fc_init_std: float) -> None:
    """§5.1 init: He (MSRA) init for convs, N(0, std^2) for the final FC, BN gamma=1/beta=0,
    and gamma=0 for each residual block's last BN when ``zero_init_residual``."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    fc = final_linear(model)
    if fc is not None:
        nn.init.normal_(fc.weight, 0.0, fc_init_std)
        if fc.bias is not None:
            nn.init.zeros_(fc.bias)
    if zero_init_residual:
        for bn in residual_last_bns(model):
            nn.init.zeros_(bn.weight)


def check_arch(arch: str, in_channels: int | None = None) -> None:
    """``model.arch`` names a network (one of :data:`BUILTIN_NETWORKS` or a torchvision classifier), and a
    torchvision one gets RGB images (``in_channels`` 3, when known): else a one-line :class:`UserError`.
    The name is checked first, so a misspelt name is an unknown network whatever the data set."""
    if arch in BUILTIN_NETWORKS:
        return
    import torchvision  # only for a name that is not lbsgd's own (the import costs ~5 s of CPU)

    if arch not in set(torchvision.models.list_models(module=torchvision.models)):
        raise UserError(f"model.arch: unknown network {arch!r} ({', '.join(BUILTIN_NETWORKS)} or a torchvision "
                        "classifier such as resnet50)")
    if in_channels is not None and in_channels != 3:
        raise UserError(f"model.arch: {arch} expects RGB images, the data has {in_channels} channel(s)")


def _torchvision_model(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def cifar_stem(model: nn.Module) -> None:
    """A torchvision ResNet for 32x32 images: one 3x3 stride-1 conv instead of the 7x7/2 conv, no max pool
    (``model.stem=cifar``; the usual ResNet-18 of CIFAR replications, e.g. CIFAR-100's warmup ladder)."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(f"model.stem: cifar needs a torchvision ResNet (conv1 and maxpool); "
                        f"{type(model).__name__} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_model(mcfg, num_classes: int, in_channels: int, bn_group: int | None) -> nn.Module:
    """Instantiate ``model.arch``, initialise it per §5.1, and use ghost BN over ``bn_group`` samples."""
    arch = mcfg.arch
    check_arch(arch, in_channels)
    if arch == "small_cnn":
        model = SmallCNN(in_channels, num_classes, mcfg.width)
    elif arch == "cifar_resnet":
        model = CifarResNet(mcfg.depth, num_classes, in_channels, str(mcfg.get("shortcut", "A")))
    else:
        model = _torchvision_model(arch, num_classes)
        if str(mcfg.get("stem", "imagenet")) == "cifar":
            cifar_stem(model)
    init_weights(model, mcfg.zero_init_residual, mcfg.fc_init_std)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum, mod.eps = mcfg.bn_momentum, mcfg.bn_eps
    if bn_group is not None:
        convert_to_ghost_bn(model, bn_group, str(mcfg.get("bn_kernel", "native")))
    return model
