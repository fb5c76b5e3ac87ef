"""Checkpoint -> network: the model a ``lbsgd train`` or ``lbsgd quantize`` checkpoint holds, and the training
config it was trained under.

The network is rebuilt from the config stored in the checkpoint (§5.1: its architecture and initialisation
are the config's, the weights the file's), under the schema's defaults for keys added since it was written,
so ``lbsgd eval`` reproduces the run's last ``val/err`` and ``lbsgd quantize`` starts from the very weights
the run ended with. Both commands read checkpoints through :func:`model_from_checkpoint` alone; every bad
file (missing, truncated, foreign, another network's weights) is a one-line error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .checkpoint import FORMAT as TRAIN_FORMAT
from .checkpoint import load_model_state, read_checkpoint
from .config import TrainConfig
from .errors import UserError, first_line
from .models import build_model
from .quantize import attach_activation_quant
from .quantized_checkpoint import FORMAT as QUANTIZED_FORMAT
from .quantized_checkpoint import dequantized_state


def training_config(stored: Any) -> DictConfig:
    """A checkpoint's stored training config over the schema's defaults (keys added since it was written)."""
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)


def classes_and_channels(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Output classes (rows of the last 2-D weight) and input channels (of the first 4-D weight)."""
    weights = [t for k, t in state.items() if k.endswith("weight") and torch.is_tensor(t)]
    fc = [t for t in weights if t.dim() == 2]
    conv = [t for t in weights if t.dim() == 4]
    if not fc or not conv:
        raise ValueError("no convolution or final linear layer in the state")
    return fc[-1].shape[0], conv[0].shape[1]


def model_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", *, ghost_bn: bool = True,
                          quantized: bool = True) -> tuple[nn.Module, DictConfig]:
    """The network a checkpoint holds, in eval mode on ``device``, and the training config it came with.

    Dispatches on the checkpoint's ``format``: ``lbsgd train``'s (the weights as trained; with ``ghost_bn``
    BN over the run's ``n`` samples per worker, §2.3, which ``eval.bn_recompute`` needs, else plain BN) or,
    with ``quantized``, ``lbsgd quantize``'s (the integer weights dequantized, plain BN, and activation fake
    quantization where it was calibrated). The model carries ``model.checkpoint_info`` (format, path,
    iteration, epoch, last_val).
    """
    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == QUANTIZED_FORMAT and not quantized:
        raise UserError(f"checkpoint: {path} is already quantized; give the fp32 checkpoint of lbsgd train")
    if fmt not in (TRAIN_FORMAT, QUANTIZED_FORMAT):
        what = f"format {fmt!r}" if fmt else f"{type(ckpt).__name__} object, not an lbsgd checkpoint"
        raise UserError(f"checkpoint: {path} was not written by lbsgd ({what}; expected {TRAIN_FORMAT})")
    try:
        cfg = training_config(ckpt["config"])
        if fmt == TRAIN_FORMAT:
            state = ckpt.get("model")
            (classes, channels), bn_group = classes_and_channels(state), cfg.batch.n if ghost_bn else None
        else:
            state = dequantized_state(ckpt)
            classes, channels, bn_group = ckpt["num_classes"], ckpt["in_channels"], None
    except Exception as exc:
        raise UserError(f"checkpoint: {path} has no usable config and model state ({first_line(exc)})") from None
    model = build_model(cfg.model, classes, channels, bn_group=bn_group)
    load_model_state(model, state, str(path))
    if fmt == QUANTIZED_FORMAT:
        attach_activation_quant(model, ckpt["activations"])
    model.checkpoint_info = {
        "format": fmt,
        "path": str(path.resolve()),
        "iteration": ckpt.get("iteration"),
        "epoch": ckpt.get("epoch"),
        "last_val": ckpt.get("last_val") or {},
    }
    return model.to(device).eval(), cfg


def check_classes(model: nn.Module, num_classes: int, cfg: DictConfig) -> None:
    """The data set the checkpoint is evaluated on has as many classes as the network predicts."""
    out_features = classes_and_channels(model.state_dict())[0]
    if num_classes != out_features:
        raise UserError(f"checkpoint: {model.checkpoint_info['path']} predicts {out_features} classes, the data set "
                        f"({cfg.data.name} {cfg.data.root or ''}) has {num_classes}")
