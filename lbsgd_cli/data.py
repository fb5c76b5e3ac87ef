"""Data: the embedded digits default and ImageFolder trees (the ImageNet cluster layout).

Two loaders, one contract (``TrainLoader.epoch`` yields this process's share of each
global minibatch of ``k*n``):

- **in memory** (small images, e.g. CIFAR-10, digits): every image is decoded once
  into a uint8 tensor (cached on disk) and augmented on the device as a batch
  (pad-and-crop, flip, normalise);
- **streaming** (ImageNet-sized images): files decoded by DataLoader workers (persistent, as
  many as ``data.num_workers``, ``auto``: :func:`resolve_num_workers`) with the paper's
  augmentation (scale and aspect-ratio crop, a JPEG decoded at reduced size where the crop
  allows, flip) into uint8 batches, which are copied to the device (pinned memory; on CUDA the
  next batch on a side stream) and normalised there (:func:`device_batches`); one persistent
  val loader per run.

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
from typing import Protocol

import torch
import torch.nn.functional as F

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


def mean_std(data: DataSource, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's per-channel mean and std as ``(1, C, 1, 1)`` tensors on ``device``."""
    return (torch.tensor(data.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(data.std, device=device).view(1, -1, 1, 1))


class DataSource(Protocol):
    """What training, evaluation and quantization need of a data set (:class:`InMemoryData`,
    :class:`StreamingData`)."""

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


def _decode_all(paths: list[str], threads: int = 4) -> torch.Tensor:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = list(pool.map(decode_file, paths, chunksize=256))
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise UserError(
            f"data.in_memory: images differ in size ({sorted(shapes)[:3]}...); use data.in_memory=false"
        )
    return torch.stack(images)


def _cache_key(root: Path, train: ImageList, val: ImageList) -> str:
    h = hashlib.sha256(str(root.resolve()).encode())
    for paths in (train.paths, val.paths):
        h.update(str(len(paths)).encode())
        for p in paths:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_imagefolder_in_memory(dcfg, classes: list[str], train: ImageList, val: ImageList) -> InMemoryData:
    root = Path(dcfg.root).expanduser()
    cache_dir = Path(dcfg.cache_dir or Path.home() / ".cache" / "lbsgd").expanduser()
    cache = cache_dir / f"{root.name}-{_cache_key(root, train, val)}.pt"
    blob = None
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
        except Exception:
            blob = None  # a broken cache is rebuilt, never fatal
    if blob is None:
        blob = {
            "train_x": _decode_all(train.paths),
            "train_y": torch.tensor(train.labels),
            "val_x": _decode_all(val.paths),
            "val_y": torch.tensor(val.labels),
        }
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save(blob, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the decode next time
    tr = TensorSplit(blob["train_x"], blob["train_y"]).subset(dcfg.train_subset)
    va = TensorSplit(blob["val_x"], blob["val_y"]).subset(dcfg.val_subset)
    mean, std = _channel_stats(tr.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(tr, va, classes, mean, std, dcfg.pad, dcfg.flip)


# --------------------------------------------------------------------------- streaming sets


class StreamingImages(torch.utils.data.Dataset):
    """Decodes one file per item into a uint8 CHW tensor; the item key carries the sample's augmentation seed.

    ``transform(image, generator)`` gets the opened, not yet decoded, file (so that a JPEG can be decoded at
    reduced size) and a ``torch.Generator`` seeded with the sample's seed (None for ``sample_seed < 0``):
    the draws depend on the sample alone, never on the worker, the process or the global RNG."""

    def __init__(self, images: ImageList, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        from PIL import Image

        path = self.images.paths[index]
        g = torch.Generator().manual_seed(sample_seed) if sample_seed >= 0 else None
        try:
            with Image.open(path) as im:
                x = self.transform(im, g)
        except Exception as exc:
            raise UserError(f"data: cannot decode image {path}: {first_line(exc)}") from None
        return x, self.images.labels[index]


def _pil_to_uint8(im) -> torch.Tensor:
    """A decoded PIL image as a uint8 CHW tensor (a channels-last view: torch's uint8 resize is fastest so)."""
    import numpy as np

    if im.mode != "RGB":
        im = im.convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _draft_scale(fmt: str | None, ratio_w: float, ratio_h: float) -> int:
    """The largest JPEG DCT scale (8, 4, 2; 1 = none) that keeps a region of ``ratio`` times the target
    size, in each dimension, at least the target size once decoded at that scale."""
    if fmt != "JPEG":
        return 1
    return next((s for s in (8, 4, 2) if ratio_w >= s and ratio_h >= s), 1)


def _decode_reduced(im, s: int):
    """Decode ``im`` at DCT scale ``1/s`` (PIL's draft); returns the RGB image and the scale it got."""
    width = im.size[0]
    got = im.draft("RGB", (width // s, im.size[1] // s))  # floor: PIL then picks exactly s
    scale = width / got[1][2] if got else 1.0
    im.load()
    return (im if im.mode == "RGB" else im.convert("RGB")), scale


def _resize(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resize_image(x, size, antialias=True)  # bilinear, antialiased: as v2.RandomResizedCrop/Resize


class RandomResizedCropDecode:
    """§5.1 augmentation of one file: scale and aspect-ratio crop to ``size``, then a horizontal flip.

    The crop box is drawn first, with torchvision's ``RandomResizedCrop`` draws (scale (0.08, 1), ratio
    (3/4, 4/3), ten tries, then the central fallback) from the sample's generator, so for the same seed the
    box in original pixels is the one torchvision's transform picks. A JPEG is then decoded at the largest
    DCT scale (1/2, 1/4, 1/8; PIL's ``Image.draft``) that keeps the box at least ``size`` in both
    dimensions; the box is mapped to the reduced image's coordinates (sub-pixel, as a float box) and
    resized to ``size`` there. Without reduction (``draft=False``, a small box, not a JPEG) the pixels are
    those of today's ``v2.RandomResizedCrop`` on the full image exactly. Returns uint8 CHW."""

    def __init__(self, size: int, flip: bool = True, draft: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)):
        self.size, self.flip, self.draft, self.scale, self.ratio = size, flip, draft, scale, ratio
        self._log_ratio = torch.log(torch.tensor(ratio))

    def box(self, height: int, width: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: torchvision's ``RandomResizedCrop.make_params``, draw for draw (the same
        kernels on the same generator: ``randint`` is ``random_``; one-element buffers are reused)."""
        area, lr = height * width, self._log_ratio
        u, e, r = torch.empty(1), torch.empty(1), torch.empty(1, dtype=torch.int64)
        for _ in range(10):
            target_area = area * u.uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect = torch.exp(u.uniform_(lr[0], lr[1], generator=g), out=e).item()  # type: ignore[arg-type]
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = r.random_(0, height - h + 1, generator=g).item()
                j = r.random_(0, width - w + 1, generator=g).item()
                return int(i), int(j), h, w
        in_ratio = float(width) / float(height)  # fallback: central crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draft_scale(self, im, box: tuple[int, int, int, int]) -> int:
        """The DCT scale this box allows (1 = full decode)."""
        if not self.draft:
            return 1
        return _draft_scale(getattr(im, "format", None), box[3] / self.size, box[2] / self.size)

    def __call__(self, im, g: torch.Generator | None) -> torch.Tensor:
        from PIL import Image

        width, height = im.size
        top, left, h, w = b = self.box(height, width, g)
        flip = self.flip and torch.rand(1, generator=g).item() < 0.5  # v2.RandomHorizontalFlip(p=0.5)'s draw
        s = self.draft_scale(im, b)
        if s > 1:
            im, s = _decode_reduced(im, s)
            im = im.resize((self.size, self.size), Image.Resampling.BILINEAR,
                           box=(left / s, top / s, (left + w) / s, (top + h) / s))
            x = _pil_to_uint8(im)
        else:
            x = _resize(_pil_to_uint8(im.crop((left, top, left + w, top + h))), [self.size, self.size])
        return x.flip(-1) if flip else x.contiguous()


class ResizeCenterCropDecode:
    """Val preprocessing: shorter side to ``resize`` (v2.Resize's output size), centre crop ``crop``; a JPEG
    whose shorter side is at least twice ``resize`` is decoded at the largest DCT scale that keeps it at
    least ``resize``. Returns uint8 CHW."""

    def __init__(self, resize: int, crop: int, draft: bool = True) -> None:
        self.resize, self.crop, self.draft = resize, crop, draft

    def __call__(self, im, g: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image

        width, height = im.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        r = short / self.resize
        s = _draft_scale(getattr(im, "format", None), r, r) if self.draft else 1
        if s > 1:
            im, s = _decode_reduced(im, s)
            x = _pil_to_uint8(im.resize((new_w, new_h), Image.Resampling.BILINEAR, box=(0, 0, width / s, height / s)))
        else:
            x = _resize(_pil_to_uint8(im), [new_h, new_w])
        top, left = int(round((new_h - self.crop) / 2.0)), int(round((new_w - self.crop) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: v2.CenterCrop pads with zeros
            from torchvision.transforms.v2 import functional as TF

            return TF.center_crop_image(x, [self.crop, self.crop]).contiguous()
        return x[:, top : top + self.crop, left : left + self.crop].contiguous()


class RawCrop:
    """``data.decode=gpu``, the worker side: the file's bytes (a JPEG; any other file is decoded here into
    uint8 CHW), its crop box in original pixels ``(x0, y0, x1, y1)`` and the flip. The box and flip are
    drawn as :class:`RandomResizedCropDecode` draws them (train) or are :class:`ResizeCenterCropDecode`'s
    centre crop mapped back to the original image (val); :func:`decode_on_device` does the rest."""

    def __init__(self, train: RandomResizedCropDecode | None = None, val: ResizeCenterCropDecode | None = None):
        self.train, self.val = train, val

    def box(self, width: int, height: int, g: torch.Generator | None) -> tuple[tuple[float, ...], bool]:
        if self.train is not None:
            top, left, h, w = self.train.box(height, width, g)
            flip = self.train.flip and torch.rand(1, generator=g).item() < 0.5
            return (left, top, left + w, top + h), flip
        v = self.val
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = v.resize, int(v.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        top, left = int(round((new_h - v.crop) / 2.0)), int(round((new_w - v.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + v.crop) * sx, (top + v.crop) * sy), False

    def __call__(self, im, g: torch.Generator | None):
        box, flip = self.box(*im.size, g)
        if getattr(im, "format", None) == "JPEG":
            with open(im.filename, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        else:
            data = _pil_to_uint8(im).contiguous()
        return data, torch.tensor(box, dtype=torch.float32), flip


def collate_raw(items):
    """Batches of :class:`RawCrop` samples: ``((list of bytes or images, boxes (B, 4), flips (B,)), labels)``."""
    return ([it[0][0] for it in items], torch.stack([it[0][1] for it in items]),
            torch.tensor([it[0][2] for it in items])), torch.tensor([it[1] for it in items])


def decode_on_device(raw, size: int, device: torch.device) -> torch.Tensor:
    """``data.decode=gpu``: decode a batch of JPEGs on ``device`` (``torchvision.io.decode_jpeg``, nvJPEG on
    CUDA) and crop each box to ``size`` x ``size`` by ``roi_align`` (bilinear, ``ceil(box / size)`` samples
    per output pixel and axis: an area average when shrinking), flip; float32 in [0, 255]."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    datas, boxes, flips = raw
    jpeg = [i for i, d in enumerate(datas) if d.dim() == 1]
    images = [d.to(device, non_blocking=True) if d.dim() == 3 else None for d in datas]
    if jpeg:
        try:
            decoded = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            raise UserError(f"data.decode=gpu: cannot decode a JPEG of this batch: {first_line(exc)}") from None
        for i, img in zip(jpeg, decoded):
            images[i] = img
    out = torch.empty(len(images), 3, size, size, device=device)
    rois = torch.cat([torch.zeros(len(images), 1), boxes], 1).to(device, non_blocking=True)  # image 0 of 1 each
    for i, (img, b) in enumerate(zip(images, boxes.tolist())):  # the host copy of the boxes: no device sync
        ratio = max(1, math.ceil(max(b[2] - b[0], b[3] - b[1]) / size))
        out[i] = roi_align(img[None].float(), rois[i : i + 1], (size, size), 1.0, ratio, aligned=True)[0]
    flips = flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(3), out)


def _gpu_decode(dcfg) -> bool:
    return str(getattr(dcfg, "decode", "cpu")) == "gpu"


def train_transform(dcfg):
    """§5.1 augmentation: scale and aspect-ratio crop (``crop_size``), flip; uint8 out (the device normalises),
    or the raw file and its box with ``data.decode=gpu``."""
    crop = RandomResizedCropDecode(dcfg.crop_size, dcfg.flip)
    return RawCrop(train=crop) if _gpu_decode(dcfg) else crop


def val_transform(dcfg, raw: bool | None = None):
    """Resize the shorter side to ``val_resize``, centre crop ``crop_size``; uint8 out (or raw, as above)."""
    crop = ResizeCenterCropDecode(dcfg.val_resize, dcfg.crop_size)
    return RawCrop(val=crop) if (_gpu_decode(dcfg) if raw is None else raw) else crop


@dataclass
class StreamingData:
    train: ImageList
    val: ImageList
    classes: list[str]
    dcfg: object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory = False
    in_channels = 3
    # the persistent val loaders of this run, one per (share, batch size, pinning): built by the first
    # evaluation, reused by every later one (see val_batches)
    val_loaders: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_workers(self) -> int:
        """``data.num_workers`` resolved (``auto``: :func:`resolve_num_workers`)."""
        return resolve_num_workers(self.dcfg.num_workers)

    @property
    def train_size(self) -> int:
        return len(self.train.paths)

    @property
    def val_size(self) -> int:
        return len(self.val.paths)

    def to(self, device: torch.device) -> StreamingData:
        return self  # batches are moved to the device as the workers deliver them

    def subset_val(self, count: int) -> None:
        self.val = self.val.subset(count)
        self.val_loaders.clear()

    def train_images(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        ds = StreamingImages(self.train, val_transform(self.dcfg, raw=False))
        mean, std = mean_std(self, device)
        return normalise(torch.stack([ds[(int(i), -1)][0] for i in indices]).to(device), mean, std)

    def val_loader(self, lo: int, hi: int, batch_size: int, pin: bool) -> torch.utils.data.DataLoader:
        """The persistent loader of val images ``[lo, hi)`` in batches (uint8; built once per run)."""
        key = (lo, hi, batch_size, pin)
        if key not in self.val_loaders:
            keys = [(i, -1) for i in range(lo, hi)]
            batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
            self.val_loaders[key] = _loader(StreamingImages(self.val, val_transform(self.dcfg)), batches,
                                            self.num_workers, pin)
        return self.val_loaders[key]


# --------------------------------------------------------------------------- building


def load_data(dcfg) -> DataSource:
    """The data set of ``data.name``, in memory or streaming as ``data.in_memory`` decides."""
    if dcfg.name == "digits":
        return load_digits_data(dcfg)
    classes, train, val = scan_imagefolder(dcfg.root)
    in_memory = dcfg.in_memory == "true"
    if dcfg.in_memory == "auto":
        w, h = _image_size(train.paths[0])
        est_gb = (len(train.paths) + len(val.paths)) * 3 * w * h / 1e9
        in_memory = max(w, h) <= dcfg.small_image_max and est_gb <= dcfg.in_memory_max_gb
    if in_memory:
        # the cache holds the full set; the subset is taken after loading
        return load_imagefolder_in_memory(dcfg, classes, train, val)
    mean = tuple(dcfg.mean) if dcfg.mean is not None else IMAGENET_MEAN
    std = tuple(dcfg.std) if dcfg.std is not None else IMAGENET_STD
    return StreamingData(train.subset(dcfg.train_subset), val.subset(dcfg.val_subset), classes, dcfg, mean, std)


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
            self._dataset = StreamingImages(data.train, train_transform(data.dcfg))
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


def _loader(dataset, batch_sampler, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """A DataLoader of uint8 batches (or raw ones: :class:`RawCrop`): persistent workers, pinned memory on CUDA."""
    raw = isinstance(dataset.transform, RawCrop)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                                       collate_fn=collate_raw if raw else None)


def device_batches(batches, device: torch.device, mean: torch.Tensor, std: torch.Tensor, decode_size: int = 0):
    """uint8 ``(x, y)`` batches as normalised float32 batches on ``device``, the next one prefetched.

    The copy and the normalisation run on the device, for the whole batch. On CUDA, batch ``i+1`` is
    copied (from pinned memory, ``non_blocking``) and normalised on a side stream while batch ``i`` trains;
    the training stream waits for that stream before it takes the batch, and the batch's memory is marked
    as used by the training stream (``record_stream``) so the allocator does not reuse it too early. On
    other devices the DataLoader's own prefetching (its workers) is all there is. With ``decode_size``
    the batches are raw (``data.decode=gpu``) and :func:`decode_on_device` makes them images first."""
    scale, shift = 1.0 / (255.0 * std), mean / std  # (x/255 - mean)/std as x*scale - shift: two passes

    def norm(x) -> torch.Tensor:
        if decode_size:
            return decode_on_device(x, decode_size, device).mul_(scale).sub_(shift)
        return x.float().mul_(scale).sub_(shift)

    if not _side_stream_prefetch(device):
        for x, y in batches:
            yield norm(x if decode_size else x.to(device)), y.to(device)
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # scale and shift are made on the current stream

    def load(batch):
        x, y = batch
        with torch.cuda.stream(side):
            x = x if decode_size else x.to(device, non_blocking=True)
            return norm(x), y.to(device, non_blocking=True)

    it = iter(batches)
    ahead = next(it, None)
    ahead = load(ahead) if ahead is not None else None
    while ahead is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        x, y = ahead
        x.record_stream(main)
        y.record_stream(main)
        nxt = next(it, None)
        ahead = load(nxt) if nxt is not None else None  # issued before batch i is handed over
        yield x, y


def _side_stream_prefetch(device: torch.device) -> bool:
    """Whether :func:`device_batches` prefetches on a CUDA side stream (CUDA devices only)."""
    return device.type == "cuda"


def resolve_num_workers(value, environ=None, affinity: int | None = None) -> int:
    """``data.num_workers``: an int as given; ``auto`` = the CPUs this process may use, less one for the
    training process, at least 1 (0 with a single CPU: the training process decodes).

    The CPUs: under SLURM (``SLURM_CPUS_PER_TASK`` set) the task's CPUs divided by the ranks that share the
    task (torchrun's ``LOCAL_WORLD_SIZE`` over ``SLURM_NTASKS_PER_NODE``; 1 when srun starts each rank),
    else this process's affinity (``os.sched_getaffinity``) divided by torchrun's local ranks; never more
    than the affinity."""
    if value != "auto":
        return int(value)
    env = os.environ if environ is None else environ
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if env.get("SLURM_CPUS_PER_TASK"):
        tasks = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0] or 1)
        cpus = min(affinity, int(env["SLURM_CPUS_PER_TASK"]) // max(1, local // max(1, tasks)))
    else:
        cpus = affinity // max(1, local)
    return 0 if cpus <= 1 else cpus - 1


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


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255).sub_(mean)).div_(std)


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
