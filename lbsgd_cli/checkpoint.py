"""Checkpoints: atomic writes, everything needed to continue, one-line errors on bad files.

A checkpoint is a dict with ``model`` (a state dict), ``optimizer``, ``iteration``
(optimizer steps done over the whole run), ``epoch`` and ``iter_in_epoch`` (where
the next step starts), ``rng`` states, the resolved ``config`` and ``meta``
(world size, versions). It is written to a temporary file in the same folder and
renamed over the old one, so a kill at any moment leaves the previous checkpoint
whole.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, first_line

FORMAT = "lbsgd-checkpoint-v1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp`` then ``os.replace``: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of any file (training or quantized checkpoint, or anything else); a missing file,
    a directory or an unreadable file is a one-line :class:`UserError` naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint: {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint: {path} is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint: {path} is not a readable checkpoint (truncated or foreign): "
                        f"{first_line(exc)}") from None


def training_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``ckpt`` (read from ``path``) if ``lbsgd train`` wrote it; anything else is a one-line :class:`UserError`."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise UserError(f"checkpoint: {Path(path).expanduser()} was not written by lbsgd (no {FORMAT} model state)")
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``lbsgd train``; anything else is a one-line :class:`UserError`."""
    return training_checkpoint(read_checkpoint(path, map_location), path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a mismatch (another network, other classes) into a one-line error."""
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"checkpoint: {source} does not fit model the config builds: {detail}") from None
