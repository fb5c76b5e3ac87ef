"""How one run is spread over processes: one process, DDP or FSDP2, behind one interface.

The training loop, ``lbsgd eval`` and the engine ask a :class:`Parallel` object, never which
strategy they have: it wraps the model, says whether the gradients of a pass are synchronised
(§3: accumulate locally, one allreduce on the last pass), reduces ghost-BN statistics and sums
over processes, gathers plain full state dicts for checkpoints (and loads them back), and yields
this process's share of the val set (padded where every rank must run as many forwards as the
others). :func:`make_parallel` picks the strategy from the process group and ``memory.fsdp``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .checkpoint import load_model_state, unwrap
from .data import largest_val_share_batches, val_batches


class Parallel:
    """A single process: no wrapping, no communication."""

    name = "single process"

    def __init__(self, dist: D.Dist | None = None) -> None:
        self.dist = dist or D.Dist(0, 0, 1, torch.device("cpu"), "single")

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this strategy trains it (the same object on one process)."""
        return model

    def grad_sync(self, model: nn.Module, last_pass: bool) -> contextlib.AbstractContextManager:
        """Context of one forward/backward pass: gradients are reduced over processes on the last pass only."""
        return contextlib.nullcontext()

    @property
    def reduce_buffers(self) -> Callable[[list[torch.Tensor]], None] | None:
        """Sums tensors over processes in place (ghost-BN statistics), or None on one process."""
        return D.all_reduce_sum if self.dist.enabled else None

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """A dict of floats summed over processes."""
        return D.reduce_scalars(values, self.device)

    def full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Plain (unsharded) model and optimizer state dicts on rank 0; empty dicts on the other ranks."""
        if not self.is_main:
            return {}, {}
        return unwrap(model).state_dict(), optimizer.state_dict()

    def load_full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                              optim_sd: dict, source: str) -> None:
        """Load the plain state dicts of any run (any strategy, any number of processes)."""
        load_model_state(model, model_sd, source)
        optimizer.load_state_dict(optim_sd)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The module evaluation calls: the bare network (no DDP forward, no buffer broadcast)."""
        return unwrap(model)

    def val_batches(self, data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This process's contiguous share of the val set; the shares of all ranks cover it once."""
        return val_batches(data, self.rank, self.world_size, batch_size, self.device)


class DDP(Parallel):
    """``DistributedDataParallel``: a replica per process, one gradient allreduce per step (§3, §4)."""

    name = "DDP"

    def __init__(self, dist: D.Dist, comm_hook: str = "none", powersgd_rank: int = 1,
                 powersgd_start_iter: int = 2) -> None:
        super().__init__(dist)
        self.comm_hook = (comm_hook, powersgd_rank, powersgd_start_iter)

    def wrap(self, model: nn.Module) -> nn.Module:
        # broadcast_buffers=False keeps ghost-BN buffers rank-local (ghost_bn reduces them once per step);
        # torch 2.14 deprecates the flag with a FutureWarning and has no replacement for it yet
        device = self.device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
            )
        D.register_comm_hook(model, *self.comm_hook)  # compressed allreduce (beyond the paper)
        return model

    def grad_sync(self, model: nn.Module, last_pass: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_pass else model.no_sync()


class FSDP2(Parallel):
    """FSDP2 (``fully_shard`` per ResNet stage and the root): 1/W of parameters, gradients and optimizer
    state per process; checkpoints stay plain full state dicts (see :mod:`lbsgd_cli.memory`)."""

    name = "FSDP2"

    def __init__(self, dist: D.Dist, cpu_offload: bool = False) -> None:
        super().__init__(dist)
        self.cpu_offload = cpu_offload

    def wrap(self, model: nn.Module) -> nn.Module:
        from .memory import shard_model

        return shard_model(model, self.dist, self.cpu_offload)

    def grad_sync(self, model: nn.Module, last_pass: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(last_pass)  # FSDP2's no_sync: unsharded gradients until the last pass
        return contextlib.nullcontext()

    def full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from .memory import full_state_dicts

        return full_state_dicts(model, optimizer)  # a collective: every rank gathers, rank 0 keeps

    def load_full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                              optim_sd: dict, source: str) -> None:
        from .memory import load_full_state_dicts

        load_full_state_dicts(model, optimizer, model_sd, optim_sd, source)

    def val_batches(self, data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """As many batches on every rank as on rank 0 (the largest share): FSDP2 all-gathers in every
        forward. The padding batches hold one image and no labels (``y is None``): they count nothing."""
        seen, x = 0, None
        for x, y in super().val_batches(data, batch_size):
            seen += 1
            yield x, y
        if x is None:
            x = next(val_batches(data, 0, 1, 1, self.device))[0]
        for _ in range(largest_val_share_batches(data, self.world_size, batch_size) - seen):
            yield x[:1], None


def make_parallel(dist: D.Dist, memory: Any = None, dist_cfg: Any = None) -> Parallel:
    """The strategy of a run: FSDP2 with ``memory.fsdp``, DDP on several processes, else one process."""
    if memory is not None and memory.fsdp:
        return FSDP2(dist, memory.fsdp_cpu_offload)
    if dist.enabled:
        hook = (dist_cfg.comm_hook, dist_cfg.powersgd_rank, dist_cfg.powersgd_start_iter) if dist_cfg else ()
        return DDP(dist, *hook)
    return Parallel(dist)
