"""§5.1's augmentation of one file, decoded by a loader worker: a JPEG at reduced size where the crop allows,
by libjpeg-turbo otherwise (:mod:`lbsgd_cli.data.decode`); uint8 CHW out, normalised later on the device.

Training: :class:`RandomResizedCropDecode` (scale and aspect-ratio crop, flip: torchvision's draws from the
sample's own generator). Val: :class:`ResizeCenterCropDecode` (shorter side to ``val_resize``, centre crop).
With ``data.decode=gpu`` the worker sends the JPEG's bytes and crop box instead (:class:`RawCrop`) and
:func:`decode_on_device` decodes and crops a whole batch on the device.
"""

from __future__ import annotations

import math

import torch

from ..choices import Decode
from ..errors import UserError, first_line
from . import decode
from .source import rgb_image

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


def resize_image(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """A uint8 CHW image resized to ``size`` (``[h, w]``) as torchvision's v2 transforms resize."""
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
    libjpeg-turbo (``turbo``, :func:`lbsgd_cli.data.decode.decode_rgb`: PIL's pixels, 1.06-1.18x the samples
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
            x = resize_image(x if x is not None else _pil_to_uint8(im.crop(region)), [self.size, self.size])
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
            x = resize_image(x if x is not None else _pil_to_uint8(im), [new_h, new_w])
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


# --------------------------------------------------------------------------- the transforms of a config


def decode_mode(dcfg) -> Decode:
    """``data.decode`` as its :class:`~lbsgd_cli.choices.Decode` (``cpu`` where the config has no such key);
    a value that is not a choice is a one-line error, never read as ``cpu``."""
    value = getattr(dcfg, "decode", Decode.cpu)
    try:
        return Decode(value)
    except ValueError:
        raise UserError(f"data.decode: must be {' or '.join(d.value for d in Decode)}, got {value!r}") from None


def decodes_on_device(dcfg) -> bool:
    """Whether the device decodes the JPEGs (``data.decode=gpu``: the workers send bytes and boxes)."""
    return decode_mode(dcfg) is Decode.gpu


def train_transform(dcfg):
    """§5.1 augmentation: scale and aspect-ratio crop (``crop_size``), flip; uint8 out (the device normalises),
    or the raw file and its box with ``data.decode=gpu``."""
    crop = RandomResizedCropDecode(dcfg.crop_size, dcfg.flip)
    if decodes_on_device(dcfg):
        return RawCrop(train=crop)
    decode.turbo_available()  # without simplejpeg: one line here, not one per worker (they fork after it)
    return crop


def val_transform(dcfg, raw: bool | None = None):
    """Resize the shorter side to ``val_resize``, centre crop ``crop_size``; uint8 out (or raw, as above)."""
    crop = ResizeCenterCropDecode(dcfg.val_resize, dcfg.crop_size)
    return RawCrop(val=crop) if (decodes_on_device(dcfg) if raw is None else raw) else crop
