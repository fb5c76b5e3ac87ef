"""Divergence: a non-finite loss stops ``lbsgd train`` at once, with nothing written after it.

A rate too large for the network (no warmup at a large ``kn``, §2.2: "training diverges" early on)
drives the loss to inf/nan. :class:`DivergenceWatch` records the first step whose loss is not finite
in a device tensor (``torch.where``, no host sync per step) and :meth:`DivergenceWatch.check` reads it
where the loop syncs anyway: at every ``log.every`` point, at the end of each epoch and before every
checkpoint write (on a one-process CPU run, every step: a CPU read is free). All ranks take the
earliest bad step of any rank, so they stop together. Before a checkpoint is written,
:meth:`DivergenceWatch.check_state` also asks whether the weights and BN statistics are finite: a huge
rate can overflow a BN running variance while the loss is still a (huge) finite number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import distributed as D
from .errors import Diverged

_NONE = torch.iinfo(torch.int64).max  # no bad step yet


class DivergenceWatch:
    """The first iteration (0-based, the index :func:`lbsgd_cli.rules.lr_at` takes) with a non-finite loss."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
        self.every_step = device.type == "cpu" and not D.initialized()  # reading is free: check each step

    def update(self, loss: torch.Tensor, iteration: int) -> None:
        """Note step ``iteration``'s loss (a device op, no sync)."""
        bad = ~torch.isfinite(loss) & (self.first_bad == _NONE)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, iteration), self.first_bad)

    def check(self, rate: Callable[[int], float], checkpoint_iteration: int | None) -> None:
        """Raise :class:`Diverged` if any rank saw a non-finite loss (a collective with several processes)."""
        first = self.first_bad.clone()
        if D.initialized():
            D.dist.all_reduce(first, op=D.dist.ReduceOp.MIN)
        at = int(first)
        if at == _NONE:
            return
        raise _diverged("loss", at, rate, checkpoint_iteration)

    def check_state(self, model: torch.nn.Module, last_step: int, rate: Callable[[int], float],
                    checkpoint_iteration: int | None) -> None:
        """Raise :class:`Diverged` if any weight or buffer of ``model`` is not finite after step ``last_step``
        (one read; a collective with several processes, whose shards differ under FSDP2)."""
        tensors = [getattr(t, "_local_tensor", t) for t in model.state_dict().values()]
        tensors = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.int32) if tensors else \
            torch.ones((), dtype=torch.int32, device=self.first_bad.device)
        ok = ok.to(self.first_bad.device)
        if D.initialized():
            D.dist.all_reduce(ok, op=D.dist.ReduceOp.MIN)
        if not int(ok):
            raise _diverged("weights or BN statistics", last_step, rate, checkpoint_iteration)


def _diverged(what: str, at: int, rate: Callable[[int], float], checkpoint_iteration: int | None) -> Diverged:
    lr = rate(at)
    kept = "no checkpoint was written" if checkpoint_iteration is None else \
        f"checkpoint kept from iteration {checkpoint_iteration}"
    return Diverged(f"non-finite {what} at iteration {at} (lr {lr:.4g}); {kept}", iteration=at, lr=lr)

