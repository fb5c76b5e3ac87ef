"""Broken files in an image tree: one line naming the file by default, ``data.skip_bad=true`` to skip and count.

What a real data set legitimately holds (CMYK JPEGs, PNG data in ``.JPEG`` files, grayscale, 16-bit PNGs;
ImageNet's train set has the first two) is decoded (:func:`lbsgd_cli.data.source.rgb_image`), never counted
here. A *bad* file is one that cannot be decoded: empty, truncated, not an image, over PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), unreadable, or not a regular file.

Without ``data.skip_bad`` the first one stops the run with one line naming it and the way out. With it:

- found while listing (not a regular file) or while decoding up front (the in-memory path), the file is
  left out of the list before training; every rank lists the same tree the same way, so every rank
  keeps the same files in the same order;
- found by a loader worker mid-epoch (the streaming path), the sample is replaced by the next file of
  the list that decodes (``index + 1``, ``index + 2``, ... with the sample's own augmentation seed):
  the epoch's permutation and every other sample stay as they were, and the replacement depends only on
  the files, never on the rank, worker or number of processes. The file is marked in a shared-memory
  byte per file (:class:`BadData`), which the training process reads;
- the count of distinct bad files (over all ranks) is printed in the run's header and written as
  ``data/bad_files`` in every epoch record of ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError, first_line

WAY_OUT = "remove or replace it, or set data.skip_bad=true to skip and count bad files"
# a worker meeting this many bad files in a row for one sample stops the run (the tree is mostly broken)
MAX_REPLACEMENTS = 64


def reason(exc: BaseException) -> str:
    """Why a file could not be decoded, in one line."""
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return f"{first_line(exc)} (PIL's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return first_line(exc)


def bad_file_error(path: str, why: str) -> UserError:
    """The one-line error of the default policy."""
    return UserError(f"data: cannot decode image {path}: {why}; {WAY_OUT}")


def replacement(index: int, attempt: int, size: int) -> int:
    """The file tried for sample ``index`` at ``attempt`` (0: the sample's own file)."""
    return (index + attempt) % size


@dataclass
class BadData:
    """The bad files of a data set under ``data.skip_bad=true`` (and what listing left out)."""

    skip: bool = False
    left_out: list[str] = field(default_factory=list)  # bad files left out before training
    notes: list[str] = field(default_factory=list)  # folders left out or missing (not files)
    # streaming: one byte per file of each split, set by loader workers (shared memory) when they meet it bad
    marks: dict[str, torch.Tensor] = field(default_factory=dict)

    def new_marks(self, split: str, size: int) -> torch.Tensor | None:
        """The shared per-file marks of ``split`` (None without ``skip``: the first bad file stops the run)."""
        if not self.skip:
            return None
        self.marks[split] = torch.zeros(size, dtype=torch.uint8).share_memory_()
        return self.marks[split]

    def count(self, device: torch.device | str = "cpu") -> int:
        """Distinct bad files so far: left out before training, plus those any rank's workers met (a
        collective with several processes: every rank calls it)."""
        met = 0
        if self.marks:
            from .. import distributed as D

            marks = torch.cat([m for _, m in sorted(self.marks.items())]).to(device)
            if D.initialized():
                D.dist.all_reduce(marks, op=D.dist.ReduceOp.MAX)
            met = int(marks.sum())
        return len(self.left_out) + met

    def header(self) -> str | None:
        """The header line under ``data.skip_bad=true`` (None otherwise)."""
        if not self.skip:
            return None
        first = f" (first: {self.left_out[0]})" if self.left_out else ""
        notes = "; " + "; ".join(self.notes) if self.notes else ""
        return (f"data.skip_bad=true: {len(self.left_out)} bad file(s) left out before training{first}{notes}; "
                "files the loader finds bad later are replaced and counted as data/bad_files per epoch")
