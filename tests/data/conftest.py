"""Helpers of the data package's tests (tests/data/): a data config and a smooth photo-like image."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig


def dcfg(**kw):
    """An ``imagefolder`` data config with ``kw`` set (the structured schema: Enums, validation)."""
    return OmegaConf.structured(DataConfig(**{"name": "imagefolder", **kw}))


def smooth_image(height: int, width: int) -> torch.Tensor:
    """An HWC uint8 image of smooth gradients: JPEG-compressible, so resampling differences stay small."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([xx, yy, (torch.sin(6 * xx) * torch.cos(5 * yy) + 1) / 2], dim=-1)
    return (img * 255).round().to(torch.uint8)
