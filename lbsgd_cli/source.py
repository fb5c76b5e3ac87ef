"""What every data set is: the :class:`DataSource` protocol, ImageFolder trees and their stratified subsets,
one image file decoded, and the per-channel normalisation (§5.1).

:mod:`lbsgd_cli.data` (in memory, Remark 4's loader) and :mod:`lbsgd_cli.streaming` (ImageNet-sized
files) both build on this module; it imports neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import UserError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- file trees


@dataclass
class ImageList:
    """Files and labels of one split of an ImageFolder tree."""

    paths: list[str]
    labels: list[int]

    def subset(self, count: int) -> ImageList:
        """A stratified subset of ``count`` files (all of them for ``count`` 0)."""
        if not count:
            return self
        keep = stratified_subset(self.labels, count)
        return ImageList([self.paths[i] for i in keep], [self.labels[i] for i in keep])


def _scan_split(split_dir: Path, classes: list[str]) -> ImageList:
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        cdir = split_dir / cls
        if not cdir.is_dir():
            raise UserError(f"data.root: {split_dir} has no folder for class {cls!r}")
        files = sorted(
            str(cdir / f) for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not files:
            raise UserError(f"data.root: class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [idx] * len(files)
    return ImageList(paths, labels)


def scan_imagefolder(root: str | os.PathLike) -> tuple[list[str], ImageList, ImageList]:
    """Classes and file lists of ``root/train/<class>/*`` and ``root/val/<class>/*``."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data.root: {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a directory")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data.root: {root} has no {split}/ folder (expected {split}/<class>/<image>)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"data.root: {root / 'train'} has no class folders")
    val_classes = sorted(d.name for d in (root / "val").iterdir() if d.is_dir() and not d.name.startswith("."))
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise UserError(f"data.root: val/ has classes that train/ lacks: {', '.join(extra[:5])}")
    if not val_classes:
        raise UserError(f"data.root: {root / 'val'} has no class folders")
    train = _scan_split(root / "train", classes)
    val = _scan_split(root / "val", [c for c in classes if c in val_classes])
    val.labels = [classes.index(val_classes[i]) for i in val.labels]
    return classes, train, val


def stratified_subset(labels: list[int], count: int, seed: int = 0) -> list[int]:
    """Indices of ``count`` samples with the class proportions of ``labels`` (fixed, seed 0)."""
    if count <= 0 or count >= len(labels):
        return list(range(len(labels)))
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    chosen = []
    for y, idx in sorted(by_class.items()):
        take = round(count * len(idx) / len(labels))
        perm = torch.randperm(len(idx), generator=g)[:take]
        chosen += [idx[j] for j in perm.tolist()]
    return sorted(chosen)


def decode_file(path: str) -> torch.Tensor:
    """A uint8 CHW RGB tensor; an unreadable image is a one-line error naming the file."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise UserError(f"data: cannot decode image {path}: {first_line(exc)}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise UserError(f"data: cannot read image {path}: {exc}") from None


# --------------------------------------------------------------------------- the protocol


def mean_std(data: DataSource, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's per-channel mean and std as ``(1, C, 1, 1)`` tensors on ``device``."""
    return (torch.tensor(data.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(data.std, device=device).view(1, -1, 1, 1))


class DataSource(Protocol):
    """What training, evaluation and quantization need of a data set (:class:`~lbsgd_cli.data.InMemoryData`,
    :class:`~lbsgd_cli.streaming.StreamingData`)."""

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool  # True: uint8 tensors augmented as batches on the device; False: files decoded by workers

    @property
    def num_classes(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def train_size(self) -> int: ...

    @property
    def val_size(self) -> int: ...

    def to(self, device: torch.device) -> DataSource:
        """The set with its tensors on ``device`` (a streaming set is unchanged)."""
        ...

    def subset_val(self, count: int) -> None:
        """Keep a stratified subset of ``count`` val images (the same images on every call)."""
        ...

    def train_images(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Training images ``indices`` with the val preprocessing (no augmentation), normalised."""
        ...


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255).sub_(mean)).div_(std)
