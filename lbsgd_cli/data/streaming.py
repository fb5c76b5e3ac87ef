"""The streaming path for ImageNet-sized images: files decoded by DataLoader workers.

Workers (persistent, as many as ``data.num_workers``, ``auto``: :func:`resolve_num_workers`) apply the
paper's augmentation (§5.1: scale and aspect-ratio crop, flip; a JPEG decoded at reduced size where the crop
allows, by libjpeg-turbo otherwise: :mod:`lbsgd_cli.decode`) and deliver uint8 batches, which are copied to
the device (pinned memory; on CUDA the next batch on a side stream) and normalised there
(:func:`device_batches`); one persistent val loader per run. With ``data.decode=gpu`` the workers send the JPEG
bytes and crop boxes instead (:class:`RawCrop`) and the device decodes (:func:`decode_on_device`), on a thread
of its own one batch ahead (on CUDA, on a stream of its own), so the training thread goes on launching the
step's kernels while the decoder waits for its stream.

Every draw comes from the sample's own generator, seeded by :class:`lbsgd_cli.data.TrainLoader` from
``(seed, epoch, position)`` (Remark 4, §3): never from the worker, the process or the global RNG.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import decode
from ..errors import UserError, first_line
from .bad_data import MAX_REPLACEMENTS, BadData, bad_file_error, reason, replacement
from .source import ImageList, mean_std, normalise, rgb_image


# --------------------------------------------------------------------------- one file per item


class StreamingImages(torch.utils.data.Dataset):
    """Decodes one file per item into a uint8 CHW tensor; the item key carries the sample's augmentation seed.

    ``transform(image, generator)`` gets the opened, not yet decoded, file (so that a JPEG can be decoded at
    reduced size) and a ``torch.Generator`` seeded with the sample's seed (None for ``sample_seed < 0``):
    the draws depend on the sample alone, never on the worker, the process or the global RNG."""

    def __init__(self, images: ImageList, transform, bad_marks: torch.Tensor | None = None) -> None:
        self.images, self.transform, self.bad_marks = images, transform, bad_marks

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """A file that cannot be decoded is a one-line error naming it; with ``bad_marks`` (``data.skip_bad``)
        it is marked there and the sample is the next file that decodes (:mod:`lbsgd_cli.bad_data`)."""
        index, sample_seed = key
        size = len(self.images.paths)
        for attempt in range(min(MAX_REPLACEMENTS, size)):
            i = replacement(index, attempt, size)
            try:
                return self._decode(i, sample_seed), self.images.labels[i]
            except Exception as exc:
                if self.bad_marks is None:
                    raise bad_file_error(self.images.paths[i], reason(exc)) from None
                self.bad_marks[i] = 1
        raise UserError(f"data: {MAX_REPLACEMENTS} files in a row from {self.images.paths[index]} on cannot be "
                        "decoded; the tree is broken beyond data.skip_bad")

    def _decode(self, index: int, sample_seed: int) -> torch.Tensor:
        from PIL import Image

        g = torch.Generator().manual_seed(sample_seed) if sample_seed >= 0 else None  # a replacement: same seed
        with Image.open(self.images.paths[index]) as im:
            return self.transform(im, g)


# ------------------------------------------------------------- §5.1 augmentation, JPEGs decoded at reduced size


def _pil_to_uint8(im) -> torch.Tensor:
    """A decoded PIL image as a uint8 CHW tensor (a channels-last view: torch's uint8 resize is fastest so)."""
    import numpy as np

    im = rgb_image(im)  # CMYK, grayscale, 16-bit PNG data: decoded, never counted bad
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
    those of today's ``v2.RandomResizedCrop`` on the full image exactly; such a JPEG is decoded by
    libjpeg-turbo (``turbo``, :func:`lbsgd_cli.decode.decode_rgb`: PIL's pixels, 1.06-1.18x the samples
    per CPU second on ImageNet-like files, ``results/performance.md``), other files by PIL. Returns uint8 CHW."""

    def __init__(self, size: int, flip: bool = True, draft: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
                 turbo: bool = True):
        self.size, self.flip, self.draft, self.scale, self.ratio = size, flip, draft, scale, ratio
        self.turbo = turbo
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
            region = (left, top, left + w, top + h)
            x = decode.decode_rgb(im, region) if self.turbo else None  # libjpeg-turbo, PIL's pixels
            x = _resize(x if x is not None else _pil_to_uint8(im.crop(region)), [self.size, self.size])
        return x.flip(-1) if flip else x.contiguous()


class ResizeCenterCropDecode:
    """Val preprocessing: shorter side to ``resize`` (v2.Resize's output size), centre crop ``crop``; a JPEG
    whose shorter side is at least twice ``resize`` is decoded at the largest DCT scale that keeps it at
    least ``resize``; other JPEGs by libjpeg-turbo (``turbo``, as :class:`RandomResizedCropDecode`). Returns
    uint8 CHW."""

    def __init__(self, resize: int, crop: int, draft: bool = True, turbo: bool = True) -> None:
        self.resize, self.crop, self.draft, self.turbo = resize, crop, draft, turbo

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
            x = decode.decode_rgb(im) if self.turbo else None  # libjpeg-turbo, PIL's pixels
            x = _resize(x if x is not None else _pil_to_uint8(im), [new_h, new_w])
        top, left = int(round((new_h - self.crop) / 2.0)), int(round((new_w - self.crop) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: v2.CenterCrop pads with zeros
            from torchvision.transforms.v2 import functional as TF

            return TF.center_crop_image(x, [self.crop, self.crop]).contiguous()
        return x[:, top : top + self.crop, left : left + self.crop].contiguous()


# --------------------------------------------------------------------------- data.decode=gpu


class RawCrop:
    """``data.decode=gpu``, the worker side: the file's bytes (a baseline JPEG in RGB or grayscale; any other
    file, CMYK and progressive JPEGs included, is decoded here into uint8 CHW: :func:`decode.needs_cpu_decode`),
    its crop box in original pixels ``(x0, y0, x1, y1)`` and the flip. The box and flip are
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
        raw = None if decode.needs_cpu_decode(im) else decode.file_bytes(im)
        if raw is None or not decode.ends_complete(raw):
            # CMYK, progressive, PNG-in-.JPEG, and a JPEG cut short (or with bytes after its end): decoded here,
            # the pixels sent; a truncated file fails here, named, or is replaced under data.skip_bad
            data = decode.decode_rgb(im)
            data = (data if data is not None else _pil_to_uint8(im)).contiguous()
        else:
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return data, torch.tensor(box, dtype=torch.float32), flip


def collate_raw(items):
    """Batches of :class:`RawCrop` samples: ``((list of bytes or images, boxes (B, 4), flips (B,)), labels)``."""
    return ([it[0][0] for it in items], torch.stack([it[0][1] for it in items]),
            torch.tensor([it[0][2] for it in items])), torch.tensor([it[1] for it in items])


CROP_GROUP = 32  # images per roi_align call at most (data.decode=gpu)


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
        if device.type == "cuda":
            # torchvision's CUDA decoder allocates its outputs on the current stream but writes them on a
            # private one that does not wait for it (pytorch/vision#9606): a block freed by this stream's
            # queued kernels could be overwritten before they read it. Waiting for this stream first (the
            # loader's side stream under device_batches: the previous batch's crops) closes that window.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            raise UserError(f"data.decode=gpu: cannot decode a JPEG of this batch: {first_line(exc)}") from None
        for i, img in zip(jpeg, decoded):
            images[i] = img
    out = torch.empty(len(images), 3, size, size, device=device)
    # one roi_align per group of images of one shape and sampling ratio (ImageNet's photos come in a few
    # sizes): a kernel per group, not per image; groups of at most CROP_GROUP bound the float copy's memory
    groups: dict[tuple, list[int]] = {}
    for i, (img, b) in enumerate(zip(images, boxes.tolist())):  # the host copy of the boxes: no device sync
        ratio = max(1, math.ceil(max(b[2] - b[0], b[3] - b[1]) / size))
        groups.setdefault((tuple(img.shape), ratio), []).append(i)
    for (_, ratio), members in groups.items():
        for lo in range(0, len(members), CROP_GROUP):
            idx = members[lo : lo + CROP_GROUP]
            stack = torch.stack([images[i] for i in idx]).float()
            rois = torch.cat([torch.arange(len(idx), dtype=torch.float32)[:, None], boxes[idx]], 1)
            crops = roi_align(stack, rois.to(device, non_blocking=True), (size, size), 1.0, ratio, aligned=True)
            out[torch.tensor(idx, device=device)] = crops
    flips = flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(3), out)


# --------------------------------------------------------------------------- the streaming set


def _gpu_decode(dcfg) -> bool:
    return str(getattr(dcfg, "decode", "cpu")) == "gpu"


def train_transform(dcfg):
    """§5.1 augmentation: scale and aspect-ratio crop (``crop_size``), flip; uint8 out (the device normalises),
    or the raw file and its box with ``data.decode=gpu``."""
    crop = RandomResizedCropDecode(dcfg.crop_size, dcfg.flip)
    if _gpu_decode(dcfg):
        return RawCrop(train=crop)
    decode.turbo_available()  # without simplejpeg: one line here, not one per worker (they fork after it)
    return crop


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
    bad: BadData = field(default_factory=BadData)  # data.skip_bad: left out at listing, marked by workers

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            self.bad.new_marks(split, len(getattr(self, split).paths))

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
        self.bad.new_marks("val", len(self.val.paths))
        self.val_loaders.clear()

    def train_images(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        ds = StreamingImages(self.train, val_transform(self.dcfg, raw=False), self.bad.marks.get("train"))
        mean, std = mean_std(self, device)
        return normalise(torch.stack([ds[(int(i), -1)][0] for i in indices]).to(device), mean, std)

    def val_loader(self, lo: int, hi: int, batch_size: int, pin: bool) -> torch.utils.data.DataLoader:
        """The persistent loader of val images ``[lo, hi)`` in batches (uint8; built once per run)."""
        key = (lo, hi, batch_size, pin)
        if key not in self.val_loaders:
            keys = [(i, -1) for i in range(lo, hi)]
            batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
            dataset = StreamingImages(self.val, val_transform(self.dcfg), self.bad.marks.get("val"))
            self.val_loaders[key] = _loader(dataset, batches, self.num_workers, pin)
        return self.val_loaders[key]


# --------------------------------------------------------------------------- loaders, device batches, workers


def _loader(dataset, batch_sampler, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """A DataLoader of uint8 batches (or raw ones: :class:`RawCrop`): persistent workers, pinned memory on CUDA."""
    raw = isinstance(dataset.transform, RawCrop)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                                       collate_fn=collate_raw if raw else None, worker_init_fn=_ignore_sigint)


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C (a terminal sends it to the whole process group): the training process
    alone decides, checkpointing at the next iteration (lbsgd_cli.train.PreemptionFlag); workers that died
    of it would break the batches that checkpoint still needs."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    if decode_size:  # data.decode=gpu: the decoder on a thread of its own (and a stream: on CUDA)
        yield from _decoded_ahead(batches, lambda x, y: (norm(x), y.to(device, non_blocking=True)), device)
        return
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


def _decoded_ahead(batches, load, device: torch.device):
    """``load(x, y)`` of batch ``i+1`` on a helper thread while batch ``i`` trains (``data.decode=gpu``).

    torchvision's device decoder waits for its own stream; on the training thread that wait would stall
    the launches of the step's kernels. On the helper thread it stalls only the next batch. On CUDA the
    helper works on a side stream, which first waits for the training stream (the scale and shift were
    made there); the training stream waits for the side stream before it takes a batch and records the
    batch's memory as its own (``record_stream``). The batches come in order; an error of the helper (a
    JPEG the device cannot decode) is raised on the training thread when it takes that batch."""
    side = torch.cuda.Stream(device) if _side_stream_prefetch(device) else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))

    def work(batch):
        if side is None:
            return load(*batch)
        with torch.cuda.stream(side):
            return load(*batch)

    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lbsgd-decode") as helper:
        nxt = next(it, None)
        ahead = helper.submit(work, nxt) if nxt is not None else None
        while ahead is not None:
            x, y = ahead.result()
            if side is not None:
                main = torch.cuda.current_stream(device)
                main.wait_stream(side)
                x.record_stream(main)
                y.record_stream(main)
            nxt = next(it, None)  # the loader's next raw batch (bytes and boxes), read on this thread
            ahead = helper.submit(work, nxt) if nxt is not None else None  # issued before batch i is handed over
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


