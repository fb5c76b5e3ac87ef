"""Activation checkpointing per ResNet stage (``memory.checkpointing=true``).

Each stage (``layer1``..``layer3`` of the CIFAR ResNet, ``layer1``..``layer4`` of a
torchvision ResNet) keeps only its input in the forward pass and recomputes its
activations in the backward pass (:func:`torch.utils.checkpoint.checkpoint`,
``use_reentrant=False``). Activation memory drops from every block's tensors to one
tensor per stage plus one stage's worth during its backward, for about one extra
forward of compute.

BatchNorm (§2.3): the recomputed forward runs in train mode and would update the BN
running statistics a second time. The recomputation therefore runs inside
:func:`_running_stats_frozen`, which restores every BN buffer (and the ghost-BN
pending sums of :mod:`lbsgd_cli.ghost_bn`) afterwards, so the statistics, like the
weights, equal those of plain training.

Peak device memory (:func:`reset_peak_memory`, :func:`peak_memory_mb`): what ``lbsgd train`` logs per
epoch (``memory/peak_allocated_mb``, ``memory/peak_reserved_mb``) and ``lbsgd eval`` writes to eval.json,
on a CUDA device; a CPU has no separate device memory to measure, so it logs nothing there.

FSDP2 (``memory.fsdp=true``, optionally ``memory.fsdp_cpu_offload=true``): parameters,
gradients and optimizer state sharded over the processes, one ``fully_shard`` per stage
plus the root; checkpoints stay plain full state dicts (see the section below).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .distributed import Dist
from .errors import UserError
from .ghost_bn import GhostBatchNorm2d


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak device memory since the last :func:`reset_peak_memory`, in MiB: ``allocated``
    (tensors) and ``reserved`` (what the caching allocator holds, what ``nvidia-smi`` shows less the CUDA
    context). Empty off CUDA."""
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.max_memory_allocated(device) / 2**20,
            "reserved": torch.cuda.max_memory_reserved(device) / 2**20}


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


def stage_names(model: nn.Module) -> list[str]:
    """The residual stages of a CIFAR or torchvision ResNet: ``layer1``, ``layer2``, ..."""
    return [f"layer{i}" for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Sequential)]


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


def shard_model(model: nn.Module, dist: Dist, cpu_offload: bool) -> nn.Module:
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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The plain (unsharded, index-keyed) model and optimizer state dicts of a model sharded by
    :func:`shard_model`, on the CPU. A collective (every rank calls it, :class:`lbsgd_cli.parallel.FSDP2`
    does); only rank 0 gets the result, the others get empty dicts.
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


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                          source: str) -> None:
    """Load plain full state dicts (as :func:`full_state_dicts` writes) into a sharded model and its optimizer."""
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
