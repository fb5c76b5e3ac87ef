"""Activation checkpointing per ResNet stage (``memory.checkpointing=true``).

Each stage (``layer1``..``layer3`` of the CIFAR ResNet, ``layer1``..``layer4`` of a
torchvision ResNet; :func:`lbsgd_cli.models.stage_names`) keeps only its input in the forward pass and
recomputes its activations in the backward pass (:func:`torch.utils.checkpoint.checkpoint`,
``use_reentrant=False``). Activation memory drops from every block's tensors to one
tensor per stage plus one stage's worth during its backward, for about one extra
forward of compute.

BatchNorm (§2.3): the recomputed forward runs in train mode and would update the BN
running statistics a second time. The recomputation therefore runs inside
:func:`_running_stats_frozen`, which restores every BN buffer (and the ghost-BN
pending sums of :mod:`lbsgd_cli.ghost_bn`) afterwards, so the statistics, like the
weights, equal those of plain training.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .ghost_bn import GhostBatchNorm2d
from .models import stage_names


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Undo any BN running-statistic update made inside the block (the checkpoint's recomputation)."""
    saved = []
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
            pending = bn.pending_stats() if isinstance(bn, GhostBatchNorm2d) else None
            saved.append((bn, [b.clone() for b in bn.buffers(recurse=False)],
                          None if pending is None else [t.clone() for t in pending]))
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, buffers, pending in saved:
                for b, old in zip(bn.buffers(recurse=False), buffers):
                    b.copy_(old)
                if isinstance(bn, GhostBatchNorm2d):
                    bn.restore_pending_stats(pending)


class CheckpointedStage(nn.Sequential):
    """An ``nn.Sequential`` stage whose activations are recomputed in backward (same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        return checkpoint(
            super().forward,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _running_stats_frozen(self)),
        )


def enable_stage_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap each ResNet stage in :class:`CheckpointedStage` in place; the state dict is unchanged."""
    names = stage_names(model)
    if not names:
        raise UserError(f"memory.checkpointing: {type(model).__name__} has no ResNet stages (layer1, layer2, ...)")
    for name in names:
        stage = getattr(model, name)
        if not isinstance(stage, CheckpointedStage):
            setattr(model, name, CheckpointedStage(OrderedDict(stage.named_children())))
    return model
