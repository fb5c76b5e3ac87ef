#!/usr/bin/env python
"""Streaming loader benchmark: images per second per core, the new loader against the former one.

    python scripts/bench/bench_loader.py [--root /tmp/lbsgd_bench_photos] [--rounds 7] [--train 480]

The data: real photographs that scikit-image and scikit-learn ship (``skimage.data`` and
``sklearn.datasets.load_sample_images``), cut by random crops, resized so that each side is 350-500
px (ImageNet's typical sizes) and saved as JPEG quality 90 in ``train/<class>/`` and ``val/<class>/``
(deterministic, seed 0; built once under ``--root``).

Per core: the cost of producing 224x224 training samples (and val samples)

- ``in-process``: ``num_workers=0``, one thread: decode, augmentation and normalisation all in the
  measuring process, so images/s is the per-image cost of one core;
- ``1 worker``: ``num_workers=1`` (one loader process) feeding this process, which normalises
  (the new loader) or receives float32 images (the former one): the worker-side rate of one core.

``former``: the streaming pipeline before issue 13, copied here verbatim (full decode, ``convert``,
torchvision v2 ``PILToTensor, RandomResizedCrop, RandomHorizontalFlip, ToDtype, Normalize`` per image
in float32, the global RNG reseeded per sample). ``new``: ``lbsgd_cli.data.TrainLoader`` / ``val_batches``
(uint8 in the workers, crop box drawn first, reduced JPEG decoding where the box allows, the batch
normalised on the device, here the CPU). Both sides get the same samples and seeds. The two sides
alternate (the order flips every round); each ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import TrainLoader, epoch_permutation, load_data, mix_seed, val_batches
from lbsgd_cli.data.source import IMAGENET_MEAN, IMAGENET_STD
from lbsgd_cli.data.streaming import StreamingData
from lbsgd_cli.data.transforms import RandomResizedCropDecode
from lbsgd_cli.errors import UserError

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat")


def make_photo_tree(root: Path, train: int, val: int, seed: int = 0, sides: tuple[int, int] = (350, 500)) -> None:
    """ImageNet-sized JPEGs (350-500 px sides) cut from the real photographs skimage and sklearn ship."""
    import numpy as np
    from PIL import Image

    marker = root / f".done-{train}-{val}-{seed}-{sides[0]}-{sides[1]}"
    if marker.exists():
        return
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = []
    for name in PHOTOS:
        try:
            sources.append(np.asarray(getattr(skimage.data, name)())[..., :3])
        except Exception as exc:  # a photo that needs a download we cannot make
            print(f"skipping skimage.data.{name}: {exc}")
    sources += list(load_sample_images().images)
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            c = i % len(sources)
            src = sources[c]
            h, w = src.shape[:2]
            tw, th = rng.randint(*sides), rng.randint(*sides)
            cw = int(w * rng.uniform(0.5, 1.0))
            ch = min(h, int(cw * th / tw))
            cw = min(cw, int(ch * tw / th))
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = Image.fromarray(np.ascontiguousarray(src[y0 : y0 + ch, x0 : x0 + cw]))
            out = root / split / f"c{c:02d}" / f"{i:05d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            img.resize((tw, th), Image.Resampling.BICUBIC).save(out, quality=90)
    marker.touch()


# --------------------------------------------------------------------------- the former pipeline, verbatim


class FormerStreamingImages(torch.utils.data.Dataset):
    """lbsgd_cli.data.streaming.StreamingImages before issue 13."""

    def __init__(self, images, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, key):
        index, sample_seed = key
        from PIL import Image

        path = self.images.paths[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:
            raise UserError(f"data: cannot decode image {path}: {exc}") from None
        if sample_seed >= 0:
            torch.manual_seed(sample_seed)  # augmentation independent of workers and processes
        return self.transform(img), self.images.labels[index]


def former_train_transform(dcfg, mean, std):
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(), v2.RandomResizedCrop(dcfg.crop_size, antialias=True)]
    if dcfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def former_val_transform(dcfg, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(dcfg.val_resize, antialias=True), v2.CenterCrop(dcfg.crop_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def former_loader(dataset, batches, workers):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=False,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# --------------------------------------------------------------------------- measuring


def epoch_keys(data: StreamingData, kn: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """TrainLoader's batches of (index, sample seed) for one process: the same samples on both sides."""
    perm = epoch_permutation(data.train_size, seed, epoch)
    iters = data.train_size // kn
    return [[(int(perm[it * kn + p]), mix_seed(seed, epoch, it * kn + p)) for p in range(kn)] for it in range(iters)]


def rate(batches) -> float:
    """Images/s over the batches of one epoch, the first batch (start-up) excluded."""
    it = iter(batches)
    next(it)
    t, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += x.shape[0]
    return seen / (time.perf_counter() - t)


class Side:
    """One pipeline at one worker count, its loader kept across rounds (persistent workers)."""

    def __init__(self, kind: str, split: str, data: StreamingData, workers: int, kn: int) -> None:
        self.kind, self.split, self.data, self.workers, self.kn = kind, split, data, workers, kn
        self.epoch, self.loader = 0, None
        if kind == "former":
            self.batches: list = []
            if split == "train":
                ds = FormerStreamingImages(data.train, former_train_transform(data.dcfg, IMAGENET_MEAN, IMAGENET_STD))
            else:
                ds = FormerStreamingImages(data.val, former_val_transform(data.dcfg, IMAGENET_MEAN, IMAGENET_STD))
                keys = [(i, -1) for i in range(data.val_size)]
                self.batches = [keys[s : s + kn] for s in range(0, len(keys), kn)]
            self.loader = former_loader(ds, _Batches(self), workers)
        elif split == "train":
            self.loader = TrainLoader(data, 1, kn, seed=0, device="cpu")
        self.uint8 = kind == "new-uint8"

    def run(self) -> float:
        self.epoch += 1
        if self.kind == "former":
            if self.split == "train":
                self.batches = epoch_keys(self.data, self.kn, 0, self.epoch)
            return rate(self.loader)
        if self.split == "train":
            if self.uint8:
                return rate(self.data.host_batches(self.loader.plans(self.epoch)))
            return rate(self.loader.epoch(self.epoch))
        if self.uint8:
            return rate(self.data.val_loader(0, self.data.val_size, self.kn, False))
        return rate(val_batches(self.data, 0, 1, self.kn, torch.device("cpu")))


class _Batches:
    def __init__(self, side: Side) -> None:
        self.side = side

    def __iter__(self):
        return iter(self.side.batches)

    def __len__(self) -> int:
        return len(self.side.batches)


def draft_share(data: StreamingData, crop_size: int, samples: int = 2000) -> float:
    """The share of training samples whose crop box allows reduced JPEG decoding."""
    from PIL import Image

    crop, used = RandomResizedCropDecode(crop_size), 0
    sizes = []
    for p in data.train.paths:
        with Image.open(p) as im:
            sizes.append((im, im.size))
    for i in range(samples):
        im, (w, h) = sizes[i % len(sizes)]
        used += crop.draft_scale(im, crop.box(h, w, torch.Generator().manual_seed(i))) > 1
    return used / samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lbsgd_bench_photos")
    ap.add_argument("--train", type=int, default=480, help="training images in the folder")
    ap.add_argument("--val", type=int, default=160, help="val images in the folder")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--big", type=int, default=160,
                    help="also train in-process on this many larger photos (800-1200 px sides), where reduced "
                         "JPEG decoding applies; 0 = skip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    make_photo_tree(root, args.train, args.val)
    import PIL
    from PIL import features

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"Pillow {PIL.__version__} (libjpeg-turbo {features.check_feature('libjpeg_turbo')}, "
          f"jpeg {features.version('jpg')}), {args.train} train / {args.val} val JPEGs under {root}, "
          f"batch {args.batch}, {args.rounds} rounds")
    rows = []
    settings = [(root, 0, ("train", "val")), (root, 1, ("train", "val"))]
    if args.big:
        big = root.with_name(root.name + "_big")
        make_photo_tree(big, args.big, 16, sides=(800, 1200))
        settings.append((big, 0, ("train",)))
    for folder, workers, splits in settings:
        data = load_data(OmegaConf.structured(DataConfig(name="imagefolder", root=str(folder), in_memory="false",
                                                         num_workers=workers)))
        label = "in-process" if workers == 0 else "1 worker"
        if folder != root:
            label += ", 800-1200 px"
        for split in splits:
            sides = [Side(kind, split, data, workers, args.batch) for kind in ("former", "new", "new-uint8")]
            times: list[list[float]] = [[], [], []]
            for r in range(args.rounds):
                order = [0, 1, 2] if r % 2 == 0 else [2, 1, 0]
                got = {i: sides[i].run() for i in order}
                for i in range(3):
                    times[i].append(got[i])
            ratios = [b / a for a, b in zip(times[0], times[1])]
            ratios8 = [b / a for a, b in zip(times[0], times[2])]
            row = (split, label, *(statistics.median(t) for t in times), statistics.median(ratios),
                   statistics.median(ratios8), min(ratios), max(ratios))
            rows.append(row)
            print(f"{split:5s} {label:24s} former {row[2]:6.1f}  new {row[3]:6.1f}  new uint8 {row[4]:6.1f} img/s  "
                  f"new/former {row[5]:.2f} (rounds {row[7]:.2f}-{row[8]:.2f})  uint8/former {row[6]:.2f}",
                  flush=True)
            del sides
            gc.collect()  # their workers are gone before the next loader forks its own
        if workers == 0:
            share = draft_share(data, data.dcfg.crop_size)
            print(f"training crops decoded at reduced size in {folder} (crop {data.dcfg.crop_size}): {share:.1%}",
                  flush=True)
    print("\n| split | mode | former img/s | new img/s | new, uint8 out img/s | new / former | range | "
          "uint8 out / former |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for split, mode, f, n, n8, ratio, ratio8, lo, hi in rows:
        print(f"| {split} | {mode} | {f:.0f} | {n:.0f} | {n8:.0f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} | {ratio8:.2f} |")


if __name__ == "__main__":
    main()
