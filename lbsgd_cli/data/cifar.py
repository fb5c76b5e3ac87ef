"""CIFAR-10 and CIFAR-100 as torchvision keeps them (``data=cifar10`` / ``data=cifar100``), read without conversion.

torchvision's layout is the archive of the data set's authors unpacked: ``cifar-10-batches-py/``
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``) and ``cifar-100-python/``
(``train``, ``test``, ``meta``). Each file is a pickled dict: ``data`` is a uint8 array of N x 3072
(1024 red, 1024 green, 1024 blue values of a 32x32 image, row by row, so a reshape gives CHW),
``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100) a list of N ints; the meta
file names the classes. The images go straight into the in-memory source (:mod:`lbsgd_cli.data.in_memory`)
(decoded once, augmented on the device: pad-and-crop and flip, §5.1); no JPEG round trip changes a pixel.

Reading a file never runs its code. torchvision's own CIFAR classes call ``pickle.load``, which runs
whatever a hostile file names; :class:`SafeUnpickler` allows only the three numpy globals a pickled
array names (its reconstructor, ``ndarray``, ``dtype``), and even those resolve to stand-ins that
record their arguments: the array is then built by ``np.frombuffer`` for plain numeric dtypes. A
batch file can hold dicts, lists, strings, numbers and numeric arrays and nothing else; any other
global is refused with a one-line error.

Integrity: every file's md5 is checked against the list torchvision carries
(``torchvision.datasets.CIFAR10.train_list`` etc., read at run time) before it is unpickled, as
torchvision does. A mismatch is an error naming the file; ``data.verify=false`` reads unchecked files
and says so in a warning line. ``data.download=true`` fetches and unpacks the archive through
torchvision's own download helper (md5-checked too) when the files are missing; it never imports the
files through torchvision's classes (their ``pickle.load``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, first_line
from .in_memory import InMemoryData, TensorSplit, channel_stats

SIDE = 32
PIXELS = 3 * SIDE * SIDE  # one row of ``data``: R, G, B planes of 32x32


@dataclass(frozen=True)
class CifarFormat:
    """One of torchvision's two CIFAR layouts; file names and md5s come from its class (:func:`torchvision_class`)."""

    name: str  # CIFAR-10
    tv_class: str  # the torchvision.datasets class that lists the files
    folder: str  # torchvision's base_folder
    labels: dict[str, tuple[str, str]]  # data.labels -> (key of the batches, key of the meta file)

    @property
    def files(self) -> tuple[list[str], list[str], str]:
        """``(train files, test files, meta file)`` as torchvision lists them."""
        cls = torchvision_class(self)
        return [f for f, _ in cls.train_list], [f for f, _ in cls.test_list], cls.meta["filename"]


CIFAR10 = CifarFormat("CIFAR-10", "CIFAR10", "cifar-10-batches-py", {"fine": ("labels", "label_names")})
CIFAR100 = CifarFormat("CIFAR-100", "CIFAR100", "cifar-100-python",
                       {"fine": ("fine_labels", "fine_label_names"), "coarse": ("coarse_labels", "coarse_label_names")})
FORMATS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def torchvision_class(fmt: CifarFormat) -> Any:
    """``torchvision.datasets.CIFAR10`` or ``CIFAR100`` (only its class attributes are used)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, fmt.tv_class)


def torchvision_md5(fmt: CifarFormat) -> dict[str, str]:
    """``{file name: md5}`` of every file of ``fmt``, as torchvision's class lists them."""
    cls = torchvision_class(fmt)
    return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


# --------------------------------------------------------------------------- reading a pickle safely

# numpy's own reconstructors never see a file's contents: the three globals a pickled array names resolve to
# the stand-ins below, which only record their arguments, and :func:`_arrays` builds each array afterwards with
# ``np.frombuffer`` from its bytes, for plain numeric dtypes alone (no object arrays, no structured dtypes).
NUMERIC = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})


class _Ndarray:
    """What the global ``numpy.ndarray`` resolves to: a marker (not callable, so a pickle cannot build with it)."""


_NDARRAY = _Ndarray()


class _DtypeStub:
    """``numpy.dtype(spec, align, copy)`` and its ``__setstate__``, recorded."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        self.spec, self.order = _text(spec), "|"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("a numpy dtype with sub-arrays or fields, which a CIFAR batch never has")
        self.order = _text(state[1])

    def resolve(self) -> np.dtype:
        spec = self.spec.lstrip("<>|=")
        if spec not in NUMERIC or self.order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"a numpy dtype {self.spec!r} ({self.order}), not a plain number")
        dt = np.dtype(spec)
        return dt if self.order in ("|", "=") else dt.newbyteorder(self.order)


class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`` and the array's ``__setstate__``, recorded."""

    def __init__(self, cls: Any, shape: Any = None, typecode: Any = None) -> None:
        if cls is not _NDARRAY:
            raise pickle.UnpicklingError("an array reconstructed as something other than numpy.ndarray")
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def resolve(self) -> np.ndarray:
        st = self.state
        if not isinstance(st, tuple) or len(st) not in (4, 5):
            raise pickle.UnpicklingError("a numpy array without its (shape, dtype, order, data) state")
        shape, dtype, fortran, raw = st[-4:]
        if not isinstance(dtype, _DtypeStub) or not isinstance(shape, tuple) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError("a numpy array with an unreadable shape or dtype")
        dt = dtype.resolve()
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # Python 2 files: latin-1 strings
        if not isinstance(raw, bytes | bytearray) or len(raw) != int(np.prod(shape)) * dt.itemsize:
            raise pickle.UnpicklingError(f"a numpy array of shape {shape} whose data is not {dt.itemsize} bytes "
                                         "per element")
        return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,  # files pickled with numpy 1 (the real ones)
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,  # files pickled with numpy 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle that names a Python global outside :data:`ALLOWED_GLOBALS`."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numeric numpy arrays; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"it names {module}.{name}, which a CIFAR batch never holds "
                                  "(refused: reading a data file never runs its code)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenGlobal("it holds a persistent reference, which a CIFAR batch never has")


def _arrays(obj: Any) -> Any:
    """``obj`` with every recorded array built (dicts, lists and tuples walked)."""
    if isinstance(obj, _ArrayStub):
        return obj.resolve()
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_arrays(v) for v in obj)
    if isinstance(obj, _DtypeStub | _Ndarray):
        raise pickle.UnpicklingError("a bare numpy dtype or class, which a CIFAR batch never holds")
    return obj


def safe_load(path: Path) -> Any:
    """The object pickled in ``path`` (Python 2's strings read as latin-1, as torchvision reads them)."""
    try:
        with open(path, "rb") as f:
            return _arrays(SafeUnpickler(f, encoding="latin1").load())
    except ForbiddenGlobal as exc:
        raise UserError(f"data.root: {path} is not a CIFAR batch: {exc}") from None
    except Exception as exc:  # truncated, damaged or not a pickle at all
        raise UserError(f"data.root: cannot read {path} (truncated or not a CIFAR pickle: "
                        f"{type(exc).__name__}: {first_line(exc) or 'no detail'})") from None


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _as_str_keys(obj: Any, path: Path) -> dict[str, Any]:
    """A batch or meta dict with ``str`` keys (Python 2 files give ``str``, files pickled with bytes keys ``bytes``)."""
    if not isinstance(obj, dict):
        raise UserError(f"data.root: {path} holds a {type(obj).__name__}, not a CIFAR batch (a dict)")
    return {_text(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- integrity


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(folder: Path, names: list[str], expected: dict[str, str], what: str) -> None:
    """Each file's md5 equals ``expected[name]``; the first that does not is a one-line error."""
    for name in names:
        want = expected.get(name)
        if want is None:
            raise UserError(f"data.root: no md5 listed for {what} file {name} (nothing to check it against)")
        got = file_md5(folder / name)
        if got != want:
            raise UserError(f"data.root: {folder / name} has md5 {got}, not torchvision's {want} for {what}: the "
                            "file is damaged or not the original; fetch it again (move the folder away and set "
                            "data.download=true) or read it unchecked with data.verify=false")


# --------------------------------------------------------------------------- finding and fetching the files


def find_folder(root: Path, fmt: CifarFormat, names: list[str]) -> Path | None:
    """``root/<torchvision's folder>`` or ``root`` itself, whichever holds one of the files; None if neither."""
    for folder in (root / fmt.folder, root):
        if any((folder / n).is_file() for n in names):
            return folder
    return None


def _missing_message(root: Path, fmt: CifarFormat) -> str:
    cls_name = f"torchvision.datasets.{fmt.tv_class}"
    url = getattr(torchvision_class(fmt), "url", "")
    return (f"data.root: no {fmt.name} files in {root} (looked in {root / fmt.folder} and {root} for torchvision's "
            f"batches); set data.download=true to fetch them there, or run {cls_name}('{root}', download=True), "
            f"or unpack {url} into {root}")


def download(root: Path, fmt: CifarFormat) -> None:
    """Fetch and unpack torchvision's archive of ``fmt`` into ``root`` (md5-checked by torchvision).

    Under torchrun only local rank 0 downloads; every rank then waits at a barrier (every rank calls this
    when ``data.download`` is set, so the barrier is always matched)."""
    import torch.distributed as dist

    names = [n for group in fmt.files[:2] for n in group] + [fmt.files[2]]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0 and find_folder(root, fmt, names) is None:
        from torchvision.datasets import utils

        cls = torchvision_class(fmt)
        print(f"data.download: fetching {cls.url} into {root}", file=sys.stderr, flush=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
            utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:
            raise UserError(f"data.download: cannot fetch {cls.url} into {root}: {first_line(exc)}") from None
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- the data set


def _read_split(folder: Path, names: list[str], label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = _as_str_keys(safe_load(path), path)
        data, labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
            shape = getattr(data, "shape", None)
            raise UserError(f"data.root: {path} has no uint8 'data' array of N x {PIXELS} "
                            f"(found {type(data).__name__} {shape or ''}); not a CIFAR batch")
        if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
            raise UserError(f"data.root: {path} has no list '{label_key}' of {len(data)} labels")
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise UserError(f"data.root: {path} has labels outside 0..{num_classes - 1} in '{label_key}'")
        xs.append(torch.from_numpy(data.reshape(-1, 3, SIDE, SIDE).copy()))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def read_cifar(dcfg: Any, expected_md5: dict[str, str] | None = None
               ) -> tuple[list[str], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Class names, ``(x, y)`` of the training files and of the test files (torchvision's "train=False": the
    val set), with ``x`` uint8 ``(N, 3, 32, 32)``. ``expected_md5`` defaults to torchvision's list."""
    fmt = FORMATS[str(dcfg.name)]
    root = Path(str(dcfg.root)).expanduser()
    train_names, test_names, meta_name = fmt.files
    names = train_names + test_names + [meta_name]
    if dcfg.get("download", False):
        download(root, fmt)
    folder = find_folder(root, fmt, names)
    if folder is None:
        raise UserError(_missing_message(root, fmt))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"data.root: {folder} has no {', '.join(missing)} ({fmt.name} is {', '.join(names)}, "
                        "as torchvision unpacks them)")
    if dcfg.get("verify", True):
        check_md5(folder, names, torchvision_md5(fmt) if expected_md5 is None else expected_md5, fmt.name)
    else:
        print(f"data.verify=false: the md5 of the {fmt.name} files in {folder} is not checked", file=sys.stderr,
              flush=True)
    labels = str(dcfg.get("labels", "fine"))
    if labels not in fmt.labels:
        raise UserError(f"data.labels: {fmt.name} has no {labels} labels ({', '.join(fmt.labels)})")
    label_key, meta_key = fmt.labels[labels]
    meta = _as_str_keys(safe_load(folder / meta_name), folder / meta_name)
    classes = meta.get(meta_key)
    if not isinstance(classes, list) or not classes:
        raise UserError(f"data.root: {folder / meta_name} has no list of class names '{meta_key}'")
    classes = [_text(c) for c in classes]
    train = _read_split(folder, train_names, label_key, len(classes))
    val = _read_split(folder, test_names, label_key, len(classes))
    return classes, train, val


def load_cifar_data(dcfg) -> InMemoryData:
    """torchvision's CIFAR-10 / CIFAR-100 batches, read as they are into memory."""
    classes, (train_x, train_y), (val_x, val_y) = read_cifar(dcfg)
    tr = TensorSplit(train_x, train_y).subset(dcfg.train_subset)
    va = TensorSplit(val_x, val_y).subset(dcfg.val_subset)
    mean, std = channel_stats(tr.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(tr, va, classes, mean, std, dcfg.pad, dcfg.flip)
