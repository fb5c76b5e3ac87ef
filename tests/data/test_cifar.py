"""``data=cifar10`` / ``data=cifar100``: torchvision's pickled batches read as they are, on files the tests write in
the exact on-disk format (Python 2 pickles, as the data set's authors wrote them), the md5 check, refused code,
truncated files, missing files, ``data.download`` and runs of ``lbsgd train`` and ``lbsgd eval``."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.checkpoint import read_checkpoint
from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import cifar, load_data
from lbsgd_cli.errors import UserError

from ..conftest import lbsgd

_RECONSTRUCT = np.zeros(1).__reduce__()[0]


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did (protocol 2): strings and bytes as ``BINSTRING``, numpy's reconstructor
    under its numpy-1 name ``numpy.core.multiarray``; the format of torchvision's CIFAR folders."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def _images(n: int, labels: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """N x 3072 uint8 rows whose class shows in the pixels (a brighter channel and a bright square)."""
    x = g.integers(0, 80, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        x[i, y % 3] += 120
        r = 4 * (y % 6)
        x[i, :, r:r + 8, r:r + 8] = 250
    return x.reshape(n, cifar.PIXELS)


def write_cifar(root: Path, name: str = "cifar10", train: int = 200, test: int = 60, classes: int | None = None,
                dump=dump_py2, seed: int = 0) -> Path:
    """torchvision's folder for ``name`` under ``root``, with ``train`` / ``test`` generated images."""
    fmt = cifar.FORMATS[name]
    folder = root / fmt.folder
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    train_names, test_names, meta = fmt.files
    classes = classes or (10 if name == "cifar10" else 100)
    per_file = {n: train // len(train_names) for n in train_names} | {n: test for n in test_names}
    for fname, count in per_file.items():
        fine = np.arange(count) % classes  # every class in every file
        g.shuffle(fine)
        batch = {b"batch_label": f"{fname} of 1".encode(), b"data": _images(count, fine, g),
                 b"filenames": [f"img_{i}.png".encode() for i in range(count)]}
        if name == "cifar10":
            batch[b"labels"] = [int(v) for v in fine]
        else:
            batch[b"fine_labels"] = [int(v) for v in fine]
            batch[b"coarse_labels"] = [int(v) // 5 for v in fine]
        dump(batch, folder / fname)
    if name == "cifar10":
        dump({b"label_names": [f"class{i}".encode() for i in range(classes)], b"num_vis": 3072,
              b"num_cases_per_batch": per_file[train_names[0]]}, folder / meta)
    else:
        dump({b"fine_label_names": [f"fine{i}".encode() for i in range(classes)],
              b"coarse_label_names": [f"coarse{i}".encode() for i in range(classes // 5)]}, folder / meta)
    return folder


def own_md5(folder: Path) -> dict[str, str]:
    return {p.name: cifar.file_md5(p) for p in folder.iterdir() if p.is_file()}


def dcfg(root: Path, name: str = "cifar10", **kw):
    return OmegaConf.structured(DataConfig(name=name, root=str(root), **kw))


@pytest.fixture
def tables(monkeypatch):
    """torchvision's md5 list replaced by the generated files' own md5s (the check itself still runs)."""
    folders: list[Path] = []

    def expected(fmt):
        return {k: v for f in folders if f.name == fmt.folder for k, v in own_md5(f).items()}

    monkeypatch.setattr(cifar, "torchvision_md5", expected)
    return folders


# --------------------------------------------------------------------------- the format


def test_real_format_files_read_pixel_for_pixel(tmp_path, tables):
    folder = write_cifar(tmp_path)
    tables.append(folder)
    classes, (tx, ty), (vx, vy) = cifar.read_cifar(dcfg(tmp_path))
    assert classes == [f"class{i}" for i in range(10)]
    assert tx.dtype == torch.uint8 and tuple(tx.shape) == (200, 3, 32, 32) and tuple(vx.shape) == (60, 3, 32, 32)
    # the first training image, read back by hand from the file: R, G, B planes of 32 rows of 32
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")  # a file this test wrote itself
    assert set(raw) == {"batch_label", "data", "filenames", "labels"}  # Python 2 strings: str keys, as real files
    assert torch.equal(tx[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert ty[:40].tolist() == raw["labels"] and sorted(set(ty.tolist())) == list(range(10))
    data = load_data(dcfg(tmp_path))
    assert data.in_memory and (data.train_size, data.val_size, data.num_classes, data.in_channels) == (200, 60, 10, 3)
    assert (data.pad, data.flip) == (4, True)


def test_the_folder_itself_and_python3_pickles_with_bytes_keys_are_read_too(tmp_path, tables):
    folder = write_cifar(tmp_path / "a", dump=lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=4)))
    tables.append(folder)
    classes, (tx, _), _ = cifar.read_cifar(dcfg(folder))  # data.root=.../cifar-10-batches-py
    assert len(classes) == 10 and tx.shape[0] == 200


def test_cifar100_fine_and_coarse_labels(tmp_path, tables):
    tables.append(write_cifar(tmp_path, "cifar100", train=300, test=100))
    fine = load_data(dcfg(tmp_path, "cifar100"))
    coarse = load_data(dcfg(tmp_path, "cifar100", labels="coarse"))
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert fine.classes[7] == "fine7" and coarse.classes[3] == "coarse3"
    assert torch.equal(coarse.train.y, fine.train.y // 5) and torch.equal(coarse.train.x, fine.train.x)
    assert (fine.train_size, fine.val_size) == (300, 100)


def test_subsets_are_stratified(tmp_path, tables):
    tables.append(write_cifar(tmp_path))
    data = load_data(dcfg(tmp_path, train_subset=100, val_subset=30))
    assert (data.train_size, data.val_size) == (100, 30)
    assert torch.bincount(data.train.y, minlength=10).tolist() == [10] * 10


# --------------------------------------------------------------------------- integrity (torchvision's md5s)


def test_md5_list_is_torchvisions():
    import torchvision.datasets as tvd

    table = cifar.torchvision_md5(cifar.CIFAR10)
    assert table["data_batch_1"] == dict(tvd.CIFAR10.train_list)["data_batch_1"]
    assert table["batches.meta"] == tvd.CIFAR10.meta["md5"] and len(table) == 7
    assert set(cifar.torchvision_md5(cifar.CIFAR100)) == {"train", "test", "meta"}
    assert cifar.CIFAR100.files == (["train"], ["test"], "meta")


def test_files_that_are_not_torchvisions_are_a_one_line_error(tmp_path):
    write_cifar(tmp_path)  # generated: their md5s are not the real files'
    with pytest.raises(UserError) as e:
        load_data(dcfg(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "data_batch_1 has md5" in msg and "c99cafc152244af753f735de768cd75f" in msg
    assert "data.verify=false" in msg


def test_a_changed_byte_fails_the_check_and_verify_false_reads_it_with_a_warning(tmp_path, capsys):
    folder = write_cifar(tmp_path)
    table = own_md5(folder)
    cifar.read_cifar(dcfg(tmp_path), expected_md5=table)  # matches
    raw = bytearray((folder / "test_batch").read_bytes())
    raw[-200] ^= 1  # one pixel
    (folder / "test_batch").write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"test_batch has md5 [0-9a-f]{32}, not torchvision's") as e:
        cifar.read_cifar(dcfg(tmp_path), expected_md5=table)
    assert "\n" not in str(e.value)
    _, _, (vx, _) = cifar.read_cifar(dcfg(tmp_path, verify=False), expected_md5=table)
    assert vx.shape[0] == 60 and "data.verify=false: the md5 of the CIFAR-10 files" in capsys.readouterr().err


# --------------------------------------------------------------------------- hostile and broken files


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "ran"
    dump_py2({b"data": _Evil(marker), b"labels": []}, folder / "data_batch_3")
    with pytest.raises(UserError) as e:  # its md5 matches the table: only the unpickler stands in the way
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))
    msg = str(e.value)
    assert "\n" not in msg and "data_batch_3 is not a CIFAR batch" in msg and "system" in msg and "never runs" in msg
    assert not marker.exists()
    # a hostile global nested in a numpy object array, and an object array alone
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.array([_Evil(marker)], dtype=object)}))
    with pytest.raises(UserError, match="is not a CIFAR batch"):
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))
    dump_py2({"data": np.array([1, 2], dtype=object)}, folder / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))
    assert not marker.exists()


def test_truncated_and_wrong_files_are_one_line_errors(tmp_path):
    folder = write_cifar(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as e:
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))
    assert "\n" not in str(e.value) and "cannot read" in str(e.value) and "data_batch_2 (truncated" in str(e.value)
    dump_py2({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, folder / "data_batch_2")
    with pytest.raises(UserError, match="no uint8 'data' array of N x 3072"):
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))
    dump_py2({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, folder / "data_batch_2")
    with pytest.raises(UserError, match=r"labels outside 0\.\.9"):
        cifar.read_cifar(dcfg(tmp_path), expected_md5=own_md5(folder))


def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(tmp_path):
    with pytest.raises(UserError) as e:
        load_data(dcfg(tmp_path / "data"))
    msg = str(e.value)
    assert "\n" not in msg and f"looked in {tmp_path / 'data' / 'cifar-10-batches-py'} and {tmp_path / 'data'}" in msg
    assert "data.download=true" in msg and "cifar-10-python.tar.gz" in msg
    folder = write_cifar(tmp_path / "data")
    (folder / "test_batch").unlink()
    with pytest.raises(UserError, match="cifar-10-batches-py has no test_batch"):
        load_data(dcfg(tmp_path / "data"))


def test_download_goes_through_torchvision_once_the_files_are_missing(tmp_path, monkeypatch, tables):
    import torchvision.datasets as tvd
    from torchvision.datasets import utils

    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):  # what the real archive unpacks to
        calls.append((url, filename, md5))
        tables.append(write_cifar(Path(root), "cifar100", train=100, test=100))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    with pytest.raises(UserError, match="no CIFAR-100 files"):
        load_data(dcfg(tmp_path, "cifar100"))  # download off: nothing fetched
    assert calls == []
    data = load_data(dcfg(tmp_path / "new", "cifar100", download=True))
    assert calls == [(tvd.CIFAR100.url, tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5)] and data.num_classes == 100
    load_data(dcfg(tmp_path / "new", "cifar100", download=True))  # present: not fetched again
    assert len(calls) == 1


# --------------------------------------------------------------------------- lbsgd train and lbsgd eval


@pytest.mark.parametrize("name, preset", [
    pytest.param("cifar10", ["experiment=cifar_baseline", "model.depth=8", "schedule.milestones=[1]"],
                 marks=pytest.mark.slow),  # training and eval runs (the fast tier reads the batches in-process)
    # the CIFAR-100 preset on its 20 coarse labels, with a ResNet-8 in place of its ResNet-18 (CPU-sized)
    pytest.param("cifar100", ["experiment=cifar100_gradual", "data.labels=coarse", "model=cifar_resnet",
                              "model.depth=8", "schedule.warmup_epochs=1", "schedule.milestones=[1]"],
                 marks=pytest.mark.slow),
])
def test_train_and_eval_end_to_end_on_generated_batches(tmp_path, tables, name, preset):
    tables.append(write_cifar(tmp_path / "data", name, train=320, test=80))
    run = tmp_path / "run"
    r = lbsgd("train", *preset, f"data.root={tmp_path / 'data'}", "batch.k=2", "batch.n=16", "schedule.epochs=2",
              "threads=1", "log.progress=none", "log.tensorboard=false", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    assert f"on {name} (320 train / 80 val)" in r.stdout
    assert read_checkpoint(run / "checkpoints" / "last.pt")["model"]["fc.weight"].shape[0] == (
        10 if name == "cifar10" else 20)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in recs if "val/err" in x][-1]
    out = tmp_path / "ev"
    e = lbsgd("eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={out}", "threads=1")
    assert e.returncode == 0, e.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["images"] == 80 and ev["top1_err"] == last["val/err"]


def test_cli_errors_are_one_line(tmp_path):
    folder = write_cifar(tmp_path / "data", train=100, test=20)
    base = ["experiment=cifar_baseline", "threads=1", "log.progress=none"]
    r = lbsgd("train", *base, f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'r1'}")  # generated files vs torchvision's md5s
    assert r.returncode == 2 and "has md5" in r.stderr and r.stderr.strip().count("\n") == 0
    raw = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(raw[:1000])
    r = lbsgd("train", *base, f"data.root={tmp_path / 'data'}", "data.verify=false", f"hydra.run.dir={tmp_path / 'r2'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("lbsgd: error: data.root: cannot read")
    assert "truncated" in lines[-1] and len(lines) == 2 and lines[0].startswith("data.verify=false: the md5")
    r = lbsgd("train", *base, f"data.root={tmp_path / 'none'}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert r.returncode == 2 and "no CIFAR-10 files" in r.stderr and r.stderr.strip().count("\n") == 0
