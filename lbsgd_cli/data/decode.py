"""JPEG decoding for the streaming loader's workers: libjpeg-turbo through ``simplejpeg``, PIL where it cannot.

The §5.1 augmentation (:mod:`lbsgd_cli.data.transforms`) draws its crop box first and then asks for the pixels. A
full decode of an ImageNet-sized JPEG is most of a sample's cost, and PIL's route to a tensor pays for more
than the decode: a 4-byte-per-pixel image (``RGBX``) converted to RGB, then copied into an array, then the
crop copied again. ``simplejpeg`` calls libjpeg-turbo's TurboJPEG API and writes the RGB pixels straight into
one NumPy array, whose crop is then copied once. The decode parameters are libjpeg's defaults, the ones PIL
uses (accurate integer DCT, "fancy" chroma upsampling), so the pixels are PIL's exactly and the samples do
not change (tested). libjpeg-turbo's fast DCT and fast upsampling were measured too and left out: no gain
beyond the run-to-run noise at ImageNet's file sizes, where the Huffman decoding dominates
(``results/performance.md``, "ImageNet-like JPEGs").

Files libjpeg-turbo does not turn into the same RGB as PIL go to PIL: CMYK and YCCK JPEGs (Adobe's inverted
inks, which PIL handles), PNG or other data in a ``.JPEG`` file (ImageNet has both), and any JPEG whose
decode raises (libjpeg's recoverable warnings, such as extraneous bytes before a marker, are errors in
``simplejpeg``'s strict mode, ignored by PIL). Grayscale and progressive JPEGs decode here, to PIL's pixels.
Without ``simplejpeg`` installed every file goes to PIL (one line says so, once per process).
"""

from __future__ import annotations

import logging

import torch

try:
    import simplejpeg
except ImportError:  # a platform without its wheel: PIL decodes everything
    simplejpeg = None

log = logging.getLogger(__name__)
warned_missing = False  # whether this process has said that simplejpeg is missing (once per process)

# PIL modes of the JPEGs libjpeg-turbo turns into PIL's RGB: YCbCr/RGB and grayscale
TURBO_MODES = ("RGB", "L")


def turbo_available() -> bool:
    """Whether libjpeg-turbo decoding (``simplejpeg``) is installed; says once per process if it is not."""
    global warned_missing
    if simplejpeg is None and not warned_missing:
        warned_missing = True
        log.warning("simplejpeg is not installed: PIL decodes the streaming loader's JPEGs (slower per core); "
                    "pip install simplejpeg")
    return simplejpeg is not None


def turbo_decodable(im) -> bool:
    """Whether this opened (not yet decoded) PIL image is a JPEG that libjpeg-turbo decodes to PIL's RGB."""
    return simplejpeg is not None and getattr(im, "format", None) == "JPEG" and im.mode in TURBO_MODES


def file_bytes(im) -> bytes:
    """The whole encoded file behind an opened PIL image (its own file object: no second ``open``)."""
    fp = im.fp
    fp.seek(0)
    return fp.read()


def decode_rgb(im, box: tuple[int, int, int, int] | None = None) -> torch.Tensor | None:
    """The pixels of ``box`` (left, top, right, bottom; None = all) of an opened JPEG as uint8 CHW (a
    channels-last view, which torch's uint8 resize is fastest on), decoded by libjpeg-turbo; ``None`` when
    PIL must decode the file instead (see the module's docstring)."""
    if not (turbo_available() and turbo_decodable(im)):
        return None
    try:
        a = simplejpeg.decode_jpeg(file_bytes(im), colorspace="RGB", fastdct=False, fastupsample=False)
    except Exception:  # noqa: BLE001 - PIL decodes it, or names the file in its own error
        return None
    width, height = im.size
    if a.shape[0] != height or a.shape[1] != width:  # never seen; PIL's size is the one the boxes were drawn on
        return None
    if box is not None:
        left, top, right, bottom = box
        a = a[top:bottom, left:right].copy()  # the crop, compact: the resize reads it in order
    return torch.from_numpy(a).permute(2, 0, 1)


def ends_complete(data: bytes) -> bool:
    """Whether a JPEG's bytes end with its end-of-image marker (``FF D9``; trailing NULs and newlines allowed).
    Not so: a truncated file, or data after the image (a camera's trailer). ``data.decode=gpu`` decodes such a
    file in the worker, where a truncated one is named as a bad file (the device decoder fails a whole batch)."""
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def needs_cpu_decode(im) -> bool:
    """``data.decode=gpu``: files the device's JPEG decoder (nvJPEG) is not given: anything but a baseline
    JPEG in RGB or grayscale, i.e. CMYK/YCCK, progressive JPEGs and PNG data in a ``.JPEG`` file. The
    worker decodes those itself and sends the pixels."""
    if getattr(im, "format", None) != "JPEG" or im.mode not in TURBO_MODES:
        return True
    return bool(im.info.get("progressive") or im.info.get("progression"))
