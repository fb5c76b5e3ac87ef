"""The integer checkpoint ``lbsgd quantize`` writes and ``lbsgd eval`` reads: ``lbsgd-quantized-v1``.

Seminar, "Reduce memory usage. Quantization": the b-bit weights of every conv and linear layer
(:class:`~lbsgd_cli.quantize.QTensor`: int8 storage, packed below 5 bits, ``(s, z)`` per output channel or
per tensor), the fp32 remainder of the state (BN, biases: the int32 / fp32 parts of an integer deployment),
the calibrated activation ranges, and the training config the network is rebuilt from
(:func:`lbsgd_cli.restore.model_from_checkpoint`). Like every checkpoint of lbsgd it holds data only
(tensors, dicts, lists, numbers, strings), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_save
from .quantize import QTensor

FORMAT = "lbsgd-quantized-v1"


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


def quantized_state(
    float_state: dict[str, torch.Tensor], qweights: dict[str, QTensor]
) -> tuple[dict[str, torch.Tensor], int]:
    """The fp32 remainder of the state (BN, biases) and the bytes of the whole quantized model."""
    rest = {k: v for k, v in float_state.items() if k not in qweights}
    floats = {k: v for k, v in rest.items() if v.is_floating_point()}
    return rest, state_bytes(floats) + sum(qt.nbytes() for qt in qweights.values())


def save_quantized(
    path: str | os.PathLike,
    model: nn.Module,
    qweights: dict[str, QTensor],
    acts: dict[str, dict[str, Any]] | None,
    *,
    config: dict[str, Any],
    quant: dict[str, Any],
    num_classes: int,
    in_channels: int,
    source: dict[str, Any] | None = None,
) -> int:
    """Write a ``lbsgd-quantized-v1`` checkpoint; returns the quantized model's bytes.

    ``source`` (path, iteration, epoch of the fp32 checkpoint) is kept for ``lbsgd eval``'s report."""
    source = source or {}
    rest, nbytes = quantized_state(model.state_dict(), qweights)
    atomic_save(
        {
            "format": FORMAT,
            "config": config,  # the training config: rebuilds the network and its data
            "quant": quant,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "float_state": {k: v.cpu() for k, v in rest.items()},
            "qweights": {k: qt.to_dict() for k, qt in qweights.items()},
            "activations": acts or {},
            "meta": {"torch": str(torch.__version__), "quant_bytes": nbytes, "source": source.get("path")},
            "iteration": source.get("iteration"),
            "epoch": source.get("epoch"),
        },
        path,
    )
    return nbytes


def dequantized_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float state dict of a loaded ``lbsgd-quantized-v1`` checkpoint: its fp32 remainder and the integer
    weights dequantized, ``s (x_q - z)``: what the float network computes with."""
    state = dict(ckpt["float_state"])
    state.update({k: QTensor.from_dict(d).dequantize() for k, d in ckpt["qweights"].items()})
    return state
