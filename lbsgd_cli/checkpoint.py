"""Checkpoints: atomic writes, everything needed to continue, one-line errors on bad files.

A checkpoint is a dict with ``model`` (a state dict), ``optimizer``, ``iteration``
(optimizer steps done over the whole run), ``epoch`` and ``iter_in_epoch`` (where
the next step starts), ``rng`` states, the resolved ``config`` and ``meta``
(world size, versions). It is written to a temporary file in the same folder and
renamed over the old one, so a kill at any moment leaves the previous checkpoint
whole; a failed write (a full disk) removes the temporary file, keeps the previous checkpoint and
raises :class:`~lbsgd_cli.errors.CheckpointWriteError` (exit status 6).

Checkpoints hold data only: tensors, dicts, lists, tuples, numbers, strings and None (the RNG states are
a tensor and Python's ``random.getstate()`` tuple of ints; the config is a plain container). Every file is
read with ``torch.load(weights_only=True)``, whose unpickler builds only those types, so a file that names
any other class or function (``os.system`` in a hostile pickle) is refused with one line before any of
its code runs. Checkpoints written before this rule hold the same data plus one harmless type of torch's
(:data:`ALLOWED_GLOBALS`) and load unchanged.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from .errors import CheckpointWriteError, UserError, first_line

FORMAT = "lbsgd-checkpoint-v1"

# The one type beyond plain data that checkpoints written before the weights_only rule hold: ``meta.torch``
# was ``torch.__version__``, a ``str`` subclass of torch's own (now written as a plain str).
ALLOWED_GLOBALS = [TorchVersion]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp`` then ``os.replace``: readers see the old file or the new one.

    A write that fails (``ENOSPC``, ``EDQUOT``, an I/O error) removes the temporary file and raises
    :class:`CheckpointWriteError`; the file at ``path`` is then the previous one, untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError, errno lost
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or _nearly_full(path.parent)
        tmp.unlink(missing_ok=True)
        what = "the disk is full" if full else first_line(exc)
        kept = f"the previous checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {what}; {kept}. Free space and run the "
                                   "same command again to resume from it") from None


def _nearly_full(folder: Path) -> bool:
    """Whether ``folder``'s file system has less than 4 MiB free (checked while the failed temporary file
    still takes its space: torch's zip writer reports ENOSPC as an ``unexpected pos`` RuntimeError)."""
    try:
        return shutil.disk_usage(folder).free < 4 * 2**20
    except OSError:
        return False


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


def _unpickler_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler stopped at (``Unsupported operand 110``), not its advice paragraph."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    return found.group(1).strip() if found else first_line(exc)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of any file (training or quantized checkpoint, or anything else):
    data only, no code runs. A missing file, a directory, an unreadable file or one that names anything
    but plain data (a class, a function) is a one-line :class:`UserError` naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint: {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint: {path} is a directory, not a checkpoint file")
    with warnings.catch_warnings(record=True) as caught:  # a refusal is its one line, no warning before it
        warnings.simplefilter("always")
        ckpt = _load_data_only(path, map_location)
    for w in caught:  # a file read: torch's other warnings still show; its note on the pickle protocol does not
        if not _PROTOCOL_NOTE.search(str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ckpt


# torch's weights-only unpickler on a file of another pickle protocol than torch.save's (a raw pickle.dump)
_PROTOCOL_NOTE = re.compile(r"Detected pickle protocol \d+ in the checkpoint")


def _load_data_only(path: Path, map_location: str | torch.device) -> Any:
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only's unpickler met a global it does not allow, or no pickle
        found = re.search(r"(?:unsupported|Unsupported) (?:global|GLOBAL):? ?(?:GLOBAL )?([\w.]+)", str(exc))
        if found is None:  # not a global: a file that is no pickle at all (text, truncated)
            raise UserError(f"checkpoint: {path} is not a readable checkpoint (truncated or foreign): "
                            f"{_unpickler_reason(exc)}") from None
        raise UserError(f"checkpoint: {path} holds code or objects other than tensors and plain data "
                        f"({found.group(1)}); refused without running any of it (lbsgd's checkpoints hold data "
                        "only)") from None
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
