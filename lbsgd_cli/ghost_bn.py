"""Ghost BatchNorm: BN statistics over exactly ``n`` samples per worker (§2.3).

In the paper each of the ``k`` workers normalises its own ``n`` samples, never
across workers. When one process holds several simulated workers, its batch of
``g*n`` samples is normalised per group of ``n`` in *one* vectorised pass: the
batch is viewed as ``(n, g*C, H, W)`` so that PyTorch's fused batch_norm kernel
computes a separate mean and variance for every (worker, channel) pair.

Running statistics follow the paper's workers: every worker updates its own
running average with its own batch statistics; since the update is linear, the
average over workers of their running statistics is updated with the average over
workers of their batch statistics, once per iteration. That average is what this
module keeps (and what the workers' models would agree on after averaging).

Under :func:`deferred_running_stats` the update is postponed until the end of the
optimizer step, so that splitting a process's workers over several forward passes
(``batch.workers_per_pass``) or over several processes updates the running
statistics exactly as one pass over all ``k`` workers would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are taken over groups of ``group_size`` samples."""

    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group_size = group_size
        self.defer = False
        self._pending: list[torch.Tensor] | None = None  # [sum of means, sum of vars, groups]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        b, c = x.shape[0], x.shape[1]
        n = self.group_size
        if b % n:
            raise ValueError(f"GhostBatchNorm2d: batch {b} is not a multiple of the BN batch n={n}")
        g = b // n
        # (g*n, C, ...) -> (n, g*C, ...): one BN channel per (worker, channel).
        xt = x.reshape(g, n, c, *x.shape[2:]).transpose(0, 1).reshape(n, g * c, *x.shape[2:])
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        # momentum=1 turns the scratch buffers into this batch's per-group mean and unbiased var.
        mean_buf = torch.zeros(g * c, device=x.device, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        var_buf = torch.ones_like(mean_buf)
        track = self.track_running_stats and self.running_mean is not None
        y = F.batch_norm(
            xt,
            mean_buf if track else None,
            var_buf if track else None,
            weight,
            bias,
            True,
            1.0,
            self.eps,
        )
        if track:
            self._update_running(mean_buf.view(g, c), var_buf.view(g, c))
        return y.reshape(n, g, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, means: torch.Tensor, vars_: torch.Tensor) -> None:
        if self.defer:
            if self._pending is None:
                self._pending = [means.sum(0), vars_.sum(0), torch.tensor(means.shape[0], device=means.device)]
            else:
                self._pending[0] += means.sum(0)
                self._pending[1] += vars_.sum(0)
                self._pending[2] += means.shape[0]
            return
        self._apply_update(means.mean(0), vars_.mean(0))

    @torch.no_grad()
    def _apply_update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), momentum)

    def pending_stats(self) -> list[torch.Tensor] | None:
        """Sums of group means and variances since the last flush, and the group count."""
        return self._pending

    @torch.no_grad()
    def flush(self, pending: list[torch.Tensor] | None = None) -> None:
        """Apply the deferred update: running stats move once, towards the mean over all groups."""
        pending = self._pending if pending is None else pending
        self._pending = None
        if pending is None:
            return
        count = pending[2].to(pending[0].dtype)
        self._apply_update(pending[0] / count, pending[1] / count)


def ghost_bn_layers(model: nn.Module) -> list[GhostBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]


@contextlib.contextmanager
def deferred_running_stats(model: nn.Module) -> Iterator[list[GhostBatchNorm2d]]:
    """Collect BN batch statistics during the block; the caller flushes them once per step."""
    layers = ghost_bn_layers(model)
    for m in layers:
        m.defer = True
    try:
        yield layers
    finally:
        for m in layers:
            m.defer = False


def flush_running_stats(layers: list[GhostBatchNorm2d], reduce=None) -> None:
    """Apply the deferred running-stat updates; ``reduce`` sums pending stats across processes."""
    if reduce is not None and layers:
        flat = [t for m in layers for t in (m.pending_stats() or [])]
        if len(flat) == 3 * len(layers):
            reduce(flat)
    for m in layers:
        m.flush()


def convert_to_ghost_bn(module: nn.Module, group_size: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a :class:`GhostBatchNorm2d` with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GhostBatchNorm2d):
            new = GhostBatchNorm2d(
                child.num_features,
                group_size,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(device=next(iter(child.buffers()), torch.empty(0)).device)
            setattr(module, name, new)
        else:
            convert_to_ghost_bn(child, group_size)
    return module
