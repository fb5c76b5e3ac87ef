"""Data: the entry point (:func:`load_data`), the in-memory sets and Remark 4's loader.

Two loaders, one contract (``TrainLoader.epoch`` yields this process's share of each
global minibatch of ``k*n``):

- **in memory** (small images, e.g. CIFAR-10, digits; this module): every image is decoded once
  into a uint8 tensor (cached on disk) and augmented on the device as a batch
  (pad-and-crop, flip, normalise);
- **streaming** (ImageNet-sized images; :mod:`lbsgd_cli.streaming`): files decoded by DataLoader
  workers with the paper's augmentation into uint8 batches, normalised on the device.

What both share (the :class:`~lbsgd_cli.source.DataSource` protocol, ImageFolder trees, stratified
subsets) is in :mod:`lbsgd_cli.source`.

Remark 4 (§3): one random permutation of the training set per epoch, cut into
minibatches of ``k*n``, each divided among the ``k`` workers ``n`` at a time; the last
incomplete minibatch is dropped. The permutation and every augmentation draw depend
only on ``(seed, epoch, iteration, position)``, never on the number of processes, so
the same experiment on 1 or W processes sees the same samples, augmented the same way.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .bad_data import MAX_REPLACEMENTS, BadData
from ..config import in_memory_mode
from ..errors import UserError
from .source import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSource,
    ImageList,
    _image_size,
    decode_file,
    mean_std,
    normalise,
    scan_imagefolder,
    stratified_subset,
)
from .streaming import StreamingData, StreamingImages, _gpu_decode, _loader, device_batches, train_transform


# --------------------------------------------------------------------------- in-memory sets


@dataclass
class TensorSplit:
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
    """A data set decoded into memory; augmentation happens on the device, per batch."""

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


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_digits_data(dcfg) -> InMemoryData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, 10 classes), no download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    idx_train, idx_val = train_test_split(
        list(range(len(y))), test_size=dcfg.val_fraction, random_state=0, stratify=digits.target
    )
    idx_train, idx_val = sorted(idx_train), sorted(idx_val)
    train = TensorSplit(x[idx_train], y[idx_train]).subset(dcfg.train_subset)
    mean, std = _channel_stats(train.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(
        train, TensorSplit(x[idx_val], y[idx_val]), [str(c) for c in range(10)], mean, std, dcfg.pad, dcfg.flip
    )


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
    mean, std = _channel_stats(tr.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(tr, va, classes, mean, std, dcfg.pad, dcfg.flip, bad)


def load_cifar_data(dcfg) -> InMemoryData:
    """torchvision's CIFAR-10 / CIFAR-100 batches (:mod:`lbsgd_cli.cifar`), read as they are into memory."""
    from .cifar import read_cifar  # imports torchvision (its md5 list) only for these sets

    classes, (train_x, train_y), (val_x, val_y) = read_cifar(dcfg)
    tr = TensorSplit(train_x, train_y).subset(dcfg.train_subset)
    va = TensorSplit(val_x, val_y).subset(dcfg.val_subset)
    mean, std = _channel_stats(tr.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(tr, va, classes, mean, std, dcfg.pad, dcfg.flip)


# --------------------------------------------------------------------------- building


def load_data(dcfg) -> DataSource:
    """The data set of ``data.name``, in memory or streaming as ``data.in_memory`` decides."""
    if dcfg.name == "digits":
        return load_digits_data(dcfg)
    if dcfg.name in ("cifar10", "cifar100"):
        return load_cifar_data(dcfg)
    bad = BadData(skip=bool(getattr(dcfg, "skip_bad", False)))
    classes, train, val = scan_imagefolder(dcfg.root, bad)
    mode = in_memory_mode(dcfg.in_memory)
    in_memory = mode == "true"
    if mode == "auto":
        w, h = _first_image_size(train.paths, bad.skip)
        est_gb = (len(train.paths) + len(val.paths)) * 3 * w * h / 1e9
        in_memory = max(w, h) <= dcfg.small_image_max and est_gb <= dcfg.in_memory_max_gb
    if in_memory:
        # the cache holds the full set; the subset is taken after loading
        return load_imagefolder_in_memory(dcfg, classes, train, val, bad)
    mean = tuple(dcfg.mean) if dcfg.mean is not None else IMAGENET_MEAN
    std = tuple(dcfg.std) if dcfg.std is not None else IMAGENET_STD
    return StreamingData(train.subset(dcfg.train_subset), val.subset(dcfg.val_subset), classes, dcfg, mean, std,
                         bad=bad)


def _first_image_size(paths: list[str], skip: bool) -> tuple[int, int]:
    """The size of the first image that opens (``data.in_memory=auto`` decides on it); without
    ``data.skip_bad`` a bad first file is its one-line error."""
    for path in paths[:MAX_REPLACEMENTS] if skip else paths[:1]:
        try:
            return _image_size(path)
        except UserError:
            if not skip:
                raise
    raise UserError(f"data: none of the first {MAX_REPLACEMENTS} training images opens (first: {paths[0]})")


# --------------------------------------------------------------------------- sampling (Remark 4)


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (same on every process and platform)."""
    h = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def epoch_permutation(train_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Remark 4: the one random shuffle of the training set for ``epoch``."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
    return torch.randperm(train_size, generator=g)


def process_slice(k: int, n: int, rank: int, world: int) -> slice:
    """The samples of a global minibatch held by process ``rank``: its ``k/world`` workers' ``n`` each."""
    per = k // world
    return slice(rank * per * n, (rank + 1) * per * n)


class TrainLoader:
    """Yields, per iteration, this process's share ``(x, y)`` of the global minibatch."""

    def __init__(self, data: DataSource, k: int, n: int, rank: int = 0, world: int = 1, *, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.data, self.k, self.n, self.seed, self.device = data, k, n, seed, torch.device(device)
        self.kn = k * n
        self.part = process_slice(k, n, rank, world)
        self.iters = data.train_size // self.kn
        self._mean, self._std = mean_std(data, device)
        if not data.in_memory:
            self._dataset = StreamingImages(data.train, train_transform(data.dcfg), data.bad.marks.get("train"))
            self._batches, self._loader = _EpochBatches(), None

    def __len__(self) -> int:
        return self.iters

    def batch_indices(self, epoch: int, it: int, perm: torch.Tensor) -> torch.Tensor:
        return perm[it * self.kn : (it + 1) * self.kn][self.part]

    def epoch(self, epoch: int, start_iter: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(self.data.train_size, self.seed, epoch)
        if self.data.in_memory:
            for it in range(start_iter, self.iters):
                yield self._in_memory_batch(epoch, it, perm)
        else:
            yield from self._streaming_epoch(epoch, start_iter, perm)

    def _in_memory_batch(self, epoch: int, it: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d: InMemoryData = self.data
        idx = self.batch_indices(epoch, it, perm).to(d.train.x.device)
        x, y = d.train.x[idx], d.train.y[idx]
        # the random draws of the whole global minibatch, then this process's part of them
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, it, 0xA06))
        shifts = torch.randint(0, 2 * d.pad + 1, (self.kn, 2), generator=g)[self.part]
        flips = (torch.rand(self.kn, generator=g) < 0.5)[self.part]
        x = augment_batch(x, shifts.to(x.device), flips.to(x.device), d.pad, d.flip)
        x = x.to(self.device, non_blocking=True)
        return normalise(x, self._mean, self._std), y.to(self.device, non_blocking=True)

    def _streaming_epoch(self, epoch: int, start_iter: int, perm: torch.Tensor):
        yield from device_batches(self.host_batches(epoch, start_iter, perm), self.device, self._mean, self._std,
                                  self.data.dcfg.crop_size if _gpu_decode(self.data.dcfg) else 0)

    def host_batches(self, epoch: int, start_iter: int = 0, perm: torch.Tensor | None = None):
        """The streaming path's uint8 ``(x, y)`` batches as the workers deliver them (before the device)."""
        if perm is None:
            perm = epoch_permutation(self.data.train_size, self.seed, epoch)
        batches = []
        for it in range(start_iter, self.iters):
            base = it * self.kn
            idx = self.batch_indices(epoch, it, perm).tolist()
            pos = range(base + self.part.start, base + self.part.stop)
            batches.append([(i, _mix(self.seed, epoch, p)) for i, p in zip(idx, pos)])
        if self._loader is None:  # one loader, persistent workers; the sampler is re-filled per epoch
            self._loader = _loader(self._dataset, self._batches, self.data.num_workers, self.device.type == "cuda")
        self._batches.batches = batches
        yield from self._loader


class _EpochBatches:
    """A batch sampler whose batches the loader sets before each epoch (it runs in the main process)."""

    def __init__(self) -> None:
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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


# --------------------------------------------------------------------------- validation shares


def val_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``total`` val images; rank 0's is the largest."""
    per = math.ceil(total / world)
    return min(rank * per, total), min((rank + 1) * per, total)


def largest_val_share_batches(data: DataSource, world: int, batch_size: int) -> int:
    """How many batches the largest share (rank 0's) of the val set takes."""
    lo, hi = val_share(data.val_size, 0, world)
    return math.ceil((hi - lo) / batch_size)


def val_batches(data: DataSource, rank: int, world: int, batch_size: int, device: torch.device):
    """This process's contiguous share of the val set, in batches; each image is seen once overall."""
    lo, hi = val_share(data.val_size, rank, world)
    mean, std = mean_std(data, device)
    if data.in_memory:
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            x = data.val.x[s:e].to(device, non_blocking=True)
            yield normalise(x, mean, std), data.val.y[s:e].to(device, non_blocking=True)
        return
    yield from device_batches(data.val_loader(lo, hi, batch_size, device.type == "cuda"), device, mean, std,
                              data.dcfg.crop_size if _gpu_decode(data.dcfg) else 0)
