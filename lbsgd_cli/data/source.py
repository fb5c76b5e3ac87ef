"""What every data set is: the :class:`DataSource` protocol, ImageFolder trees and their stratified subsets,
one image file decoded, and the per-channel normalisation (§5.1).

The sources (:mod:`lbsgd_cli.data.in_memory`, :mod:`lbsgd_cli.data.streaming`) build on this module; it
imports neither.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import UserError
from .bad_data import WAY_OUT, BadData, bad_file_error, reason
from .sampling import BatchPlan

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


def _scan_split(split_dir: Path, classes: list[str], bad: BadData) -> ImageList:
    """The image files of each class folder, sorted. An entry with an image name that is not a regular file
    (a folder, a pipe, a broken link: ``DirEntry.is_file``, no extra system call) and an empty class folder
    are one-line errors, or left out and reported under ``data.skip_bad=true``."""
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        cdir = split_dir / cls
        if not cdir.is_dir():
            raise UserError(f"data.root: {split_dir} has no folder for class {cls!r}")
        with os.scandir(cdir) as entries:
            named = sorted((e for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS)
                            and not e.name.startswith(".")), key=lambda e: e.name)
        files = []
        for e in named:
            if e.is_file():
                files.append(str(cdir / e.name))
            elif bad.skip:
                bad.left_out.append(str(cdir / e.name))
            else:
                raise UserError(f"data: {cdir / e.name} is not a regular file (a folder, a pipe or a broken link); "
                                f"{WAY_OUT}")
        if not files:
            if not bad.skip:
                raise UserError(f"data.root: class folder {cdir} has no images ({', '.join(IMAGE_EXTENSIONS)}); add "
                                "images or remove the folder, or set data.skip_bad=true to keep the class without them")
            bad.notes.append(f"class folder {cdir} has no images")
        paths += files
        labels += [idx] * len(files)
    return ImageList(paths, labels)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_imagefolder(root: str | os.PathLike, bad: BadData | None = None) -> tuple[list[str], ImageList, ImageList]:
    """Classes and file lists of ``root/train/<class>/*`` and ``root/val/<class>/*``.

    The classes are train/'s folders. A val/ whose classes differ from them is a one-line error naming the
    classes; under ``data.skip_bad=true`` (``bad.skip``) val classes that train/ lacks are left out and train
    classes that val/ lacks are evaluated without images, both reported in ``bad.notes``."""
    bad = bad if bad is not None else BadData()
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data.root: {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a directory")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data.root: {root} has no {split}/ folder (expected {split}/<class>/<image>)")
    classes = _class_folders(root / "train")
    if not classes:
        raise UserError(f"data.root: {root / 'train'} has no class folders")
    val_classes = _class_folders(root / "val")
    if not val_classes:
        raise UserError(f"data.root: {root / 'val'} has no class folders")
    extra = sorted(set(val_classes) - set(classes))
    missing = sorted(set(classes) - set(val_classes))
    if extra and not bad.skip:
        raise UserError(f"data.root: val/ has classes that train/ lacks: {', '.join(extra[:5])}; make val/'s class "
                        "folders those of train/, or set data.skip_bad=true to leave them out")
    if missing and not bad.skip:
        raise UserError(f"data.root: val/ lacks classes of train/: {', '.join(missing[:5])}; make val/'s class "
                        "folders those of train/, or set data.skip_bad=true to evaluate without them")
    if extra:
        bad.notes.append(f"val/ classes that train/ lacks left out: {', '.join(extra[:5])}")
    if missing:
        bad.notes.append(f"val/ lacks {len(missing)} class(es) of train/: {', '.join(missing[:5])}")
    train = _scan_split(root / "train", classes, bad)
    present = [c for c in classes if c in val_classes]
    val = _scan_split(root / "val", present, bad)
    val.labels = [classes.index(present[i]) for i in val.labels]
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


def rgb_image(im):
    """``im`` as an 8-bit RGB PIL image, whatever a real data set holds: CMYK (ImageNet has some), grayscale,
    palette, alpha, and 16-bit grayscale PNGs (PIL's ``I;16`` modes, whose ``convert("RGB")`` clips every
    value above 255 to white: scaled to 8 bits here, ``v >> 8``). 16-bit RGB PNGs PIL reduces itself."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit samples (mode I: PIL's older 16-bit PNGs)
        import numpy as np

        arr = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
    if im.mode == "F":
        import numpy as np

        return Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def decode_file(path: str) -> torch.Tensor:
    """A uint8 CHW RGB tensor; an undecodable image is a one-line error naming the file and the way out."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(rgb_image(im))
    except Exception as exc:
        raise bad_file_error(path, reason(exc)) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file (its header only); a file that does not open is its one-line error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise bad_file_error(path, reason(exc)) from None


# --------------------------------------------------------------------------- the protocol


def mean_std(data: DataSource, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's per-channel mean and std as ``(1, C, 1, 1)`` tensors on ``device``."""
    return (torch.tensor(data.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(data.std, device=device).view(1, -1, 1, 1))


class DataSource(Protocol):
    """What training, evaluation and quantization need of a data set
    (:class:`~lbsgd_cli.data.in_memory.InMemoryData`, :class:`~lbsgd_cli.data.streaming.StreamingData`).

    Each source makes its own batches: from Remark 4's plans (:mod:`lbsgd_cli.data.sampling`) for training,
    from a range of the val set for evaluation, normalised on the device either way."""

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool  # True: uint8 tensors augmented as batches on the device; False: files decoded by workers
    bad: BadData  # data.skip_bad: the bad files left out or met so far (lbsgd_cli/data/bad_data.py)

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

    def train_batches(self, plans: list[BatchPlan], device: torch.device
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One normalised, augmented ``(x, y)`` batch on ``device`` per plan, in order (§5.1's augmentation)."""
        ...

    def val_batches(self, lo: int, hi: int, batch_size: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Val images ``[lo, hi)`` in batches of ``batch_size``, preprocessed and normalised on ``device``."""
        ...


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255).sub_(mean)).div_(std)
