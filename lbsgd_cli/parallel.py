"""How one run is spread over processes: one process, DDP or FSDP2, behind one interface.

The training loop, ``lbsgd eval`` and the engine ask a :class:`Parallel` object, never which
strategy they have: it wraps the model, says whether the gradients of a pass are synchronised
(§3: accumulate locally, one allreduce on the last pass), reduces ghost-BN statistics and sums
over processes, gathers plain full state dicts for checkpoints (and loads them back), and yields
this process's share of the val set (padded where every rank must run as many forwards as the
others). :func:`make_parallel` picks the strategy from the process group and ``memory.fsdp``.

FSDP2's sharding (:func:`shard_model`, one ``fully_shard`` per ResNet stage plus the root) and its plain full
state dicts (:func:`fsdp_full_state_dicts`, :func:`fsdp_load_full_state_dicts`) are here too: checkpoints
stay the DDP/1-process format, so runs move freely between ``memory.fsdp=true`` and ``false``.
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
from .errors import UserError
from .models import stage_names


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


# --------------------------------------------------------------------------- FSDP2 (memory.fsdp)
#
# §3 "Distributed SGD": every process holds a full replica and gradients are averaged once per
# step. FSDP2 (per-parameter sharding, torch.distributed.fsdp.fully_shard) keeps 1/W of every
# parameter, gradient and optimizer state on each of the W processes and all-gathers a stage's
# parameters just before its forward and backward; the reduce-scatter that replaces DDP's
# allreduce divides by W like DDP does, so train.py's ``loss_scale = W/(k*n)`` gives the same
# gradient sum/(k*n) (Remark 3). Ghost-BN running statistics are buffers, which FSDP2 does not
# shard: every rank keeps all of them and ghost_bn reduces them once per step, as with DDP.
# Checkpoints stay plain full state dicts (the DDP/1-process format), so runs move freely
# between memory.fsdp=true and false.

_FULL = dict(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, dist: D.Dist, cpu_offload: bool) -> nn.Module:
    """``fully_shard`` each ResNet stage, then the root (stem, head), over all ``dist.world_size`` ranks.

    With ``cpu_offload`` the shards, their gradients and the optimizer state live in CPU memory and
    the optimizer step runs there (CPUOffloadPolicy); pinned memory is used only for CUDA copies.
    The model is changed in place (same object, same state-dict keys) and returned.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not dist.enabled:
        raise UserError("memory.fsdp: shards the model over processes; launch >= 2 with torchrun "
                        "(torchrun --nproc_per_node=2 -m lbsgd_cli train ...) or srun")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if cpu_offload else OffloadPolicy()
    for name in stage_names(model):
        fully_shard(getattr(model, name), mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index ``i`` of ``optimizer.state_dict()`` is name ``i``."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def fsdp_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The plain (unsharded, index-keyed) model and optimizer state dicts of a model sharded by
    :func:`shard_model`, on the CPU. A collective (every rank calls it, :class:`FSDP2` does); only rank 0
    gets the result, the others get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    options = StateDictOptions(**_FULL)
    model_sd = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not model_sd:  # not rank 0
        return {}, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    optim_sd = {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in by_name["param_groups"]],
    }
    return model_sd, optim_sd


def fsdp_load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                          source: str) -> None:
    """Load plain full state dicts (as :func:`fsdp_full_state_dicts` writes) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

    names = _param_names(model, optimizer)
    options = StateDictOptions(full_state_dict=True)
    try:
        by_name = {
            "state": {names[int(i)]: state for i, state in optim_sd["state"].items()},
            "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in optim_sd["param_groups"]],
        }
        set_model_state_dict(model, model_sd, options=options)
    except (RuntimeError, KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise UserError(f"checkpoint: {source} does not fit the model the config builds: {first}") from None
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


class FSDP2(Parallel):
    """FSDP2 (``fully_shard`` per ResNet stage and the root): 1/W of parameters, gradients and optimizer
    state per process; checkpoints stay plain full state dicts (see :func:`shard_model`)."""

    name = "FSDP2"

    def __init__(self, dist: D.Dist, cpu_offload: bool = False) -> None:
        super().__init__(dist)
        self.cpu_offload = cpu_offload

    def wrap(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.dist, self.cpu_offload)

    def grad_sync(self, model: nn.Module, last_pass: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(last_pass)  # FSDP2's no_sync: unsharded gradients until the last pass
        return contextlib.nullcontext()

    def full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return fsdp_full_state_dicts(model, optimizer)  # a collective: every rank gathers, rank 0 keeps

    def load_full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                              optim_sd: dict, source: str) -> None:
        fsdp_load_full_state_dicts(model, optimizer, model_sd, optim_sd, source)

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
