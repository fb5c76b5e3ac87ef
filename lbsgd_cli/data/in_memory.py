"""The in-memory source: small images (CIFAR-10 trees, torchvision's CIFAR, digits) decoded once into uint8
tensors and augmented as whole batches where they live (§5.1 for small images: pad-and-crop, flip).

An ImageFolder tree is decoded by threads and cached on disk (``data.cache_dir``); torchvision's CIFAR
batches (:mod:`lbsgd_cli.data.cifar`) and scikit-learn's digits (:mod:`lbsgd_cli.data.digits`) are read
into the same :class:`InMemoryData`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .bad_data import BadData
from .sampling import BatchPlan
from .source import ImageList, decode_file, mean_std, normalise, stratified_subset

AUGMENT_SALT = 0xA06  # the pad-and-crop and flip draws of a global minibatch: (seed, epoch, iteration, salt)


@dataclass
class TensorSplit:
    """One split (train or val) of an in-memory set: its images and labels."""

    x: torch.Tensor  # uint8, (N, C, H, W)
    y: torch.Tensor  # int64, (N,)

    def subset(self, count: int) -> TensorSplit:
        """A stratified subset of ``count`` images (all of them for ``count`` 0)."""
        if not count:
            return self
        keep = torch.tensor(stratified_subset(self.y.tolist(), count), device=self.y.device)
        return TensorSplit(self.x[keep], self.y[keep])


@dataclass
class InMemoryData:
    """A data set decoded into memory (small images: an ImageFolder tree, CIFAR, digits); augmentation happens
    where the tensors are (the device, after :meth:`to`), per batch."""

    train: TensorSplit
    val: TensorSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool
    bad: BadData = field(default_factory=BadData)  # data.skip_bad: files left out when decoding
    in_memory = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def train_size(self) -> int:
        return self.train.x.shape[0]

    @property
    def val_size(self) -> int:
        return self.val.x.shape[0]

    def to(self, device: torch.device) -> InMemoryData:
        self.train = TensorSplit(self.train.x.to(device), self.train.y.to(device))
        self.val = TensorSplit(self.val.x.to(device), self.val.y.to(device))
        return self

    def subset_val(self, count: int) -> None:
        self.val = self.val.subset(count)

    def train_images(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        mean, std = mean_std(self)
        return normalise(self.train.x[indices.to(self.train.x.device)].cpu(), mean, std).to(device)

    def train_batches(self, plans: list[BatchPlan], device: torch.device
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each plan's images, padded-and-cropped and flipped as a batch where they are (§5.1's small-image
        augmentation), normalised on ``device``. The draws are made for the whole global minibatch, from
        the plan's generator, and this process keeps its part of them: the same on 1 or W processes."""
        mean, std = mean_std(self, device)
        for plan in plans:
            idx = plan.indices.to(self.train.x.device)
            x, y = self.train.x[idx], self.train.y[idx]
            g = plan.minibatch_generator(AUGMENT_SALT)
            shifts = torch.randint(0, 2 * self.pad + 1, (plan.kn, 2), generator=g)[plan.part]
            flips = (torch.rand(plan.kn, generator=g) < 0.5)[plan.part]
            x = augment_batch(x, shifts.to(x.device), flips.to(x.device), self.pad, self.flip)
            x = x.to(device, non_blocking=True)
            yield normalise(x, mean, std), y.to(device, non_blocking=True)

    def val_batches(self, lo: int, hi: int, batch_size: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Val images ``[lo, hi)`` as they are, in batches, normalised on ``device``."""
        mean, std = mean_std(self, device)
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            x = self.val.x[s:e].to(device, non_blocking=True)
            yield normalise(x, mean, std), self.val.y[s:e].to(device, non_blocking=True)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (the data set's own normalisation when data.mean is unset)."""
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def augment_batch(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Pad-and-crop (random offsets in ``[0, 2*pad]``) and horizontal flip of a uint8 batch."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (shifts[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (shifts[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = xp[bi, ci, rows, cols]
    if flip:
        x = torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)
    return x


# --------------------------------------------------------------------------- ImageFolder trees in memory


def _decode_all(paths: list[str], bad: BadData, threads: int = 4) -> tuple[torch.Tensor, list[int]]:
    """Every file decoded; returns the images and the indices of ``paths`` they are. A bad file is the
    first one's one-line error, or under ``data.skip_bad`` left out and added to ``bad.left_out``."""
    def one(path: str) -> torch.Tensor | None:
        try:
            return decode_file(path)
        except UserError:
            if not bad.skip:
                raise
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = list(pool.map(one, paths, chunksize=256))  # the first bad file in list order raises
    keep = [i for i, im in enumerate(decoded) if im is not None]
    bad.left_out += [paths[i] for i, im in enumerate(decoded) if im is None]
    images = [decoded[i] for i in keep]
    if not images:
        raise UserError(f"data: none of the {len(paths)} images of a split could be decoded (first: {paths[0]})")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise UserError(
            f"data.in_memory: images differ in size ({sorted(shapes)[:3]}...); use data.in_memory=false"
        )
    return torch.stack(images), keep


def _cache_key(root: Path, train: ImageList, val: ImageList) -> str:
    h = hashlib.sha256(str(root.resolve()).encode())
    for paths in (train.paths, val.paths):
        h.update(str(len(paths)).encode())
        for p in paths:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_imagefolder_in_memory(dcfg, classes: list[str], train: ImageList, val: ImageList,
                               bad: BadData | None = None) -> InMemoryData:
    """An ImageFolder tree of small images decoded once (threads) into memory, cached in ``data.cache_dir`` under
    a key of the files' paths, sizes and times; a cache that cannot be read is rebuilt, never fatal."""
    root = Path(dcfg.root).expanduser()
    cache_dir = Path(dcfg.cache_dir or Path.home() / ".cache" / "lbsgd").expanduser()
    cache = cache_dir / f"{root.name}-{_cache_key(root, train, val)}.pt"
    blob = None
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
        except Exception:
            blob = None  # a broken cache is rebuilt, never fatal
    bad = bad if bad is not None else BadData()
    if blob is not None and blob.get("bad") and not bad.skip:
        decode_file(blob["bad"][0])  # cached under data.skip_bad=true: the same one-line error as without a cache
    if blob is None:
        listed = len(bad.left_out)
        train_x, train_keep = _decode_all(train.paths, bad)
        val_x, val_keep = _decode_all(val.paths, bad)
        blob = {
            "train_x": train_x,
            "train_y": torch.tensor([train.labels[i] for i in train_keep]),
            "val_x": val_x,
            "val_y": torch.tensor([val.labels[i] for i in val_keep]),
            "bad": bad.left_out[listed:],  # files left out by decoding (data.skip_bad=true)
        }
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save(blob, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the decode next time
    else:
        bad.left_out += list(blob.get("bad", []))
    tr = TensorSplit(blob["train_x"], blob["train_y"]).subset(dcfg.train_subset)
    va = TensorSplit(blob["val_x"], blob["val_y"]).subset(dcfg.val_subset)
    mean, std = channel_stats(tr.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(tr, va, classes, mean, std, dcfg.pad, dcfg.flip, bad)
