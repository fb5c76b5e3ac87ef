"""``data.name`` and ``data.in_memory`` -> the data source (:func:`load_data`).

Small images (at most ``data.small_image_max`` on their longer side: CIFAR-10 trees, digits) are decoded into
memory and augmented with pad-and-crop and flip (:mod:`lbsgd_cli.data.in_memory`); ImageNet-sized ones stream
with the paper's scale and aspect-ratio crop (§5.1, :mod:`lbsgd_cli.data.streaming`). ``data.in_memory=auto``
decides by the first training image's size and the set's size in memory; ``true`` and ``false`` force it. A
tree of small images streamed as much larger crops is said in one line (:func:`small_streamed_note`).
"""

from __future__ import annotations

from ..config import in_memory_mode
from ..errors import UserError
from .bad_data import MAX_REPLACEMENTS, BadData
from .digits import load_digits_data
from .in_memory import load_imagefolder_in_memory
from .source import IMAGENET_MEAN, IMAGENET_STD, DataSource, image_size, scan_imagefolder
from .streaming import StreamingData


def load_data(dcfg) -> DataSource:
    """The data set of ``data.name``, in memory or streaming as ``data.in_memory`` decides."""
    if dcfg.name == "digits":
        return load_digits_data(dcfg)
    if dcfg.name in ("cifar10", "cifar100"):
        from .cifar import load_cifar_data  # imports torchvision (its md5 list) only for these sets

        return load_cifar_data(dcfg)
    bad = BadData(skip=bool(getattr(dcfg, "skip_bad", False)))
    classes, train, val = scan_imagefolder(dcfg.root, bad)
    mode = in_memory_mode(dcfg.in_memory)
    in_memory = mode == "true"
    if mode == "auto":
        w, h = first_image_size(train.paths, bad.skip)
        est_gb = (len(train.paths) + len(val.paths)) * 3 * w * h / 1e9
        in_memory = is_small(w, h, dcfg) and est_gb <= dcfg.in_memory_max_gb
    if in_memory:
        # the cache holds the full set; the subset is taken after loading
        return load_imagefolder_in_memory(dcfg, classes, train, val, bad)
    note = small_streamed_note(dcfg, mode, train.paths)
    if note and _prints():
        print(note, flush=True)
    mean = tuple(dcfg.mean) if dcfg.mean is not None else IMAGENET_MEAN
    std = tuple(dcfg.std) if dcfg.std is not None else IMAGENET_STD
    return StreamingData(train.subset(dcfg.train_subset), val.subset(dcfg.val_subset), classes, dcfg, mean, std,
                         bad=bad)


def is_small(width: int, height: int, dcfg) -> bool:
    """The small-image rule: at most ``data.small_image_max`` on the longer side (pad-and-crop, not §5.1's crop)."""
    return max(width, height) <= dcfg.small_image_max


def first_image_size(paths: list[str], skip: bool) -> tuple[int, int]:
    """The size of the first image that opens (``data.in_memory=auto`` decides on it); without
    ``data.skip_bad`` a bad first file is its one-line error."""
    for path in paths[:MAX_REPLACEMENTS] if skip else paths[:1]:
        try:
            return image_size(path)
        except UserError:
            if not skip:
                raise
    raise UserError(f"data: none of the first {MAX_REPLACEMENTS} training images opens (first: {paths[0]})")


def small_streamed_note(dcfg, mode: str, paths: list[str]) -> str | None:
    """One line when a tree of small images (the small-image rule) streams as crops larger than its images.

    The streaming source scales each image up to ``data.crop_size`` (224 by default: a 32x32 CIFAR-10 tree
    then trains on 49 times the pixels, about 2 img/s on a CPU), while in memory the same tree trains at its
    own size with pad-and-crop and flip. The streamed batches are left as they are (a run's results never
    change); the line names the keys to set. None when the images are not small, not smaller than the crop,
    or the first image does not open (the loader names a bad file when it meets it)."""
    try:
        w, h = image_size(paths[0])
    except (UserError, IndexError):
        return None
    crop, side = int(dcfg.crop_size), max(w, h)
    if not is_small(w, h, dcfg) or crop < 2 * side:  # much smaller: at least 4x the pixels per crop
        return None
    why = ("data.in_memory=false" if mode == "false"
           else f"data.in_memory=auto (the set is over data.in_memory_max_gb={dcfg.in_memory_max_gb:g})")
    return (f"note: {why} streams these {w}x{h} images (small: data.small_image_max={dcfg.small_image_max}) as "
            f"{crop}x{crop} crops (data.crop_size), {crop * crop / (w * h):.0f}x their pixels; set "
            f"data.in_memory=true to train on them at {w}x{h} with pad-and-crop and flip, as in memory, or "
            f"data.crop_size={side} data.val_resize={side} to stream them at their size")


def _prints() -> bool:
    """Whether this process prints the data set's notes: rank 0 (torchrun's or SLURM's), or a single process."""
    from .. import distributed as D

    return D.launch_env().rank == 0
