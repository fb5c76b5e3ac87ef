"""Weights in CPU memory, computation on the accelerator (seminar, "Reduce memory usage").

Two modes, both with Hugging Face accelerate's hooks (a well-kept library: the same
hooks serve diffusers' ``enable_sequential_cpu_offload`` and ``enable_model_cpu_offload``):

- ``sequential`` (the seminar's *CPU offloading*): :func:`accelerate.cpu_offload`. The
  parameters stay in CPU memory; each submodule's weights are copied to the execution
  device just before its forward and dropped after it. Peak accelerator memory is one
  submodule's weights plus activations; every forward pays the full weight transfer.
- ``model`` (the seminar's *model offloading*): :func:`accelerate.cpu_offload_with_hook`.
  The whole model moves to the execution device on its first forward and stays there
  until ``release()`` (or the next model of a chain) sends it back, so several models
  (e.g. the fp32 and quantized networks of ``lbsgd quantize``) share one accelerator.

BN running statistics are buffers; accelerate keeps buffers on the execution device
(``offload_buffers=False``), so a train-mode forward (``eval.bn_recompute``) updates them
in place under every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("none", "sequential", "model")


@dataclass
class Placed:
    """A model ready to run on ``device``; ``release()`` frees the accelerator (a no-op where nothing is held)."""

    model: nn.Module
    device: torch.device
    mode: str
    release: Callable[[], None]
    hook: object | None = None  # accelerate's UserCpuOffloadHook for mode=model (to chain models)


def place(model: nn.Module, mode: str, device: torch.device | str, after: Placed | None = None) -> Placed:
    """Put ``model`` (anywhere) under offload ``mode`` with execution device ``device``.

    ``after``: with ``mode=model``, a model placed before; it is offloaded to the CPU just before
    this one runs, so the two never occupy the accelerator together.
    """
    device = torch.device(device)
    if mode == "none":
        return Placed(model.to(device), device, mode, lambda: None)
    model = model.to("cpu")
    if mode == "sequential":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=device, offload_buffers=False)
        return Placed(model, device, mode, lambda: None)
    if mode == "model":
        from accelerate import cpu_offload_with_hook

        prev = after.hook if after is not None else None
        model, hook = cpu_offload_with_hook(model, execution_device=device, prev_module_hook=prev)
        return Placed(model, device, mode, hook.offload, hook)
    raise ValueError(f"unknown offload mode {mode!r} (expected one of {MODES})")


def remove(model: nn.Module) -> nn.Module:
    """Detach accelerate's hooks (weights return to their modules, on the CPU for ``sequential``)."""
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    return model
