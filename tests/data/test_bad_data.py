"""Broken and unusual image files, in memory and streaming (loader worker processes): what a real data set
legitimately holds decodes correctly and is never counted; a bad file is one line naming it and the way out,
or with data.skip_bad=true is skipped, counted (header, metrics.jsonl) and replaced the same way on every
rank."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import TrainLoader, load_data, val_batches
from lbsgd_cli.data.bad_data import BadData
from lbsgd_cli.data.source import decode_file, scan_imagefolder
from lbsgd_cli.data.transforms import RandomResizedCropDecode, RawCrop, ResizeCenterCropDecode, decode_on_device
from lbsgd_cli.errors import UserError

from ..conftest import lbsgd, make_image_tree

BIG = 40  # streaming trees: images larger than small_image_max would be; crops of 32


def dcfg(**kw):
    return OmegaConf.structured(DataConfig(**{"name": "imagefolder", **kw}))


def stream_cfg(root: Path, **kw):
    return dcfg(root=str(root), in_memory="false", crop_size=32, val_resize=36, **kw)


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grayscale but not 16-bit RGB): ``arr`` uint16 HxW or HxWx3."""
    h, w = arr.shape[:2]
    color = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def legit_files(folder: Path, size: int) -> dict[str, np.ndarray]:
    """CMYK JPEG, PNG data named .JPEG, grayscale JPEG, 16-bit grayscale and RGB PNGs; their expected RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    Image.new("CMYK", (size, size), (0, 255, 255, 0)).save(folder / "cmyk.JPEG", quality=95)  # pure red
    expect["cmyk.JPEG"] = np.broadcast_to(np.array([255, 0, 0]), (size, size, 3))
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(folder / "png_inside.JPEG", format="PNG")
    expect["png_inside.JPEG"] = rgb
    Image.new("L", (size, size), 90).save(folder / "gray.jpg", quality=95)
    expect["gray.jpg"] = np.full((size, size, 3), 90)
    g16 = np.full((size, size), 40000, np.uint16)
    png16(folder / "gray16.png", g16)
    expect["gray16.png"] = np.full((size, size, 3), 40000 >> 8)  # 156, not PIL's clipped 255
    c16 = np.zeros((size, size, 3), np.uint16)
    c16[..., 0], c16[..., 2] = 30000, 60000
    png16(folder / "rgb16.png", c16)
    expect["rgb16.png"] = c16 >> 8
    return expect


def make_bad(path: Path, kind: str) -> Path:
    """A bad file of ``kind`` at ``path`` (an image name)."""
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        img = np.random.RandomState(0).randint(0, 255, (BIG, BIG, 3)).astype(np.uint8)
        Image.fromarray(img).save(path, format="JPEG", quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not_an_image":
        path.write_bytes(b"this is text, not a JPEG")
    elif kind == "bomb":  # a real one: 13400^2 pixels > 2 x PIL.Image.MAX_IMAGE_PIXELS, 1 bit each, tiny as a PNG
        Image.new("1", (13400, 13400)).save(path, format="PNG")
    elif kind == "not_a_file":
        path.mkdir()
    else:
        raise ValueError(kind)
    return path


def deny_reading(monkeypatch, path: Path) -> None:
    """An unreadable file. Tests run as root, whom file permissions (chmod 000) do not stop, so the open
    is made to fail with the PermissionError that the OS gives everyone else (inherited by forked workers)."""
    real_open = Image.open

    def fake_open(fp, *args, **kwargs):
        if str(fp) == str(path):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", fake_open)


# --------------------------------------------------------------------------- legitimate files


def test_cmyk_png_named_jpeg_grayscale_and_16_bit_png_decode_correctly_on_every_path(tmp_path):
    expect = legit_files(tmp_path / "f", BIG)
    crop = RandomResizedCropDecode(BIG, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image
    val = ResizeCenterCropDecode(BIG, BIG)
    for name, want in expect.items():
        path = str(tmp_path / "f" / name)
        tol = 3 if name.endswith(("JPEG", "jpg")) else 0
        got = decode_file(path).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - want).max() <= tol, (name, "in memory")
        for transform in (crop, val):
            with Image.open(path) as im:
                x = transform(im, torch.Generator().manual_seed(0)).permute(1, 2, 0).numpy().astype(int)
            assert np.abs(x - want).max() <= tol + 1, (name, type(transform).__name__)
        with Image.open(path) as im:  # data.decode=gpu's worker side, then the device (the CPU here)
            raw = RawCrop(val=val)(im, None)
        out = decode_on_device(([raw[0]], raw[1][None], torch.tensor([raw[2]])), BIG, torch.device("cpu"))
        assert np.abs(out[0].permute(1, 2, 0).numpy() - want).max() <= tol + 2, (name, "decode=gpu")


def test_legitimate_files_are_never_counted_bad(tmp_path):
    root = make_image_tree(tmp_path / "d", size=BIG, per_class=2, val_per_class=1)
    legit_files(root / "train" / "a", BIG)
    for extra in ({"in_memory": "true", "cache_dir": str(tmp_path / "cache")}, {}):
        data = load_data(dcfg(root=str(root), skip_bad=True, num_workers=0, crop_size=32, val_resize=36,
                              **({"in_memory": "false"} | extra)))
        assert data.train_size == 11
        if not data.in_memory:
            list(data.host_batches(TrainLoader(data, 1, 11, seed=0).plans(0)))
        assert data.bad.count() == 0 and data.bad.left_out == []


# --------------------------------------------------------------------------- the default: one line


BAD_KINDS = ["zero_byte", "truncated", "not_an_image", "bomb"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_file_in_memory_is_one_line_naming_it_and_the_way_out(tmp_path, kind):
    root = make_image_tree(tmp_path / "d", per_class=3, val_per_class=1)
    bad = make_bad(root / "train" / "b" / "0001.jpg", kind)
    with pytest.raises(UserError) as info:
        load_data(dcfg(root=str(root), in_memory="true", cache_dir=str(tmp_path / "cache")))
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "data.skip_bad=true" in msg
    if kind == "bomb":
        assert "decompression-bomb limit" in msg


@pytest.mark.parametrize("decode", ["cpu", pytest.param("gpu", marks=pytest.mark.slow)])  # gpu: a second loader
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_file_met_mid_epoch_by_a_loader_worker_is_one_line_naming_it(tmp_path, kind, decode):
    """data.decode=gpu too: a JPEG cut short never reaches the device decoder (which would fail the whole
    batch without a name): its missing end marker has the worker decode it, and fail on it, naming it."""
    root = make_image_tree(tmp_path / "d", size=BIG, per_class=4, val_per_class=1)
    bad = make_bad(root / "train" / "c" / "0002.jpg", kind)
    data = load_data(stream_cfg(root, num_workers=1, decode=decode))  # a worker process decodes (or reads)
    loader = TrainLoader(data, 2, 2, seed=0)
    with pytest.raises(UserError) as info:
        for _ in data.host_batches(loader.plans(0)):
            pass
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data: cannot decode image {bad}: ") and "data.skip_bad=true" in msg


@pytest.mark.slow  # loader worker processes
def test_an_unreadable_file_is_one_line_in_memory_and_in_a_worker(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "d", size=BIG, per_class=2, val_per_class=1)
    locked = root / "train" / "a" / "0001.jpg"
    deny_reading(monkeypatch, locked)
    with pytest.raises(UserError, match=f"{locked}: permission denied; remove or replace it"):
        load_data(dcfg(root=str(root), in_memory="true", cache_dir=str(tmp_path / "cache")))
    data = load_data(stream_cfg(root, num_workers=1))
    with pytest.raises(UserError, match=f"{locked}: permission denied"):
        list(data.host_batches(TrainLoader(data, 2, 3, seed=0).plans(0)))


def test_an_entry_that_is_not_a_regular_file_is_one_line_at_listing(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    odd = make_bad(root / "train" / "a" / "folder.jpg", "not_a_file")
    with pytest.raises(UserError, match=f"{odd} is not a regular file") as info:
        scan_imagefolder(root)
    assert "data.skip_bad=true" in str(info.value)
    bad = BadData(skip=True)
    _, train, _ = scan_imagefolder(root, bad)
    assert str(odd) not in train.paths and bad.left_out == [str(odd)]


@pytest.mark.parametrize("case,message", [
    ("empty_class", r"has no images \(.*\); add images or remove the folder, or set data.skip_bad=true"),
    ("val_extra_class", "val/ has classes that train/ lacks: zzz; make val/'s class folders"),
    ("val_missing_class", "val/ lacks classes of train/: c; make val/'s class folders"),
])
def test_empty_class_folders_and_val_classes_unlike_train_s(tmp_path, case, message):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    if case == "empty_class":
        for f in (root / "train" / "b").iterdir():
            f.unlink()
    elif case == "val_extra_class":
        make_image_tree(tmp_path / "x", classes=("zzz",), per_class=1, val_per_class=1)
        (tmp_path / "x" / "val" / "zzz").rename(root / "val" / "zzz")
    else:
        import shutil

        shutil.rmtree(root / "val" / "c")
    with pytest.raises(UserError, match=message) as info:
        scan_imagefolder(root)
    assert "\n" not in str(info.value)
    bad = BadData(skip=True)
    classes, train, val = scan_imagefolder(root, bad)
    assert classes == ["a", "b", "c"] and len(bad.notes) == 1 and not bad.left_out
    assert set(val.labels) <= {0, 1, 2} and len(val.paths) == (2 if case == "val_missing_class" else 3)
    assert len(train.paths) == (4 if case == "empty_class" else 6)


# --------------------------------------------------------------------------- data.skip_bad=true


def test_skip_bad_in_memory_leaves_bad_files_out_and_counts_them(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=3, val_per_class=2)
    make_bad(root / "train" / "a" / "0000.jpg", "truncated")
    make_bad(root / "val" / "b" / "0001.jpg", "zero_byte")
    for _ in range(2):  # decoded, then from the cache: the same count
        data = load_data(dcfg(root=str(root), in_memory="true", skip_bad=True, cache_dir=str(tmp_path / "cache")))
        assert (data.train_size, data.val_size, data.bad.count()) == (8, 5, 2)
        assert data.train.y.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(UserError, match="0000.jpg"):  # the cache does not hide them from the default policy
        load_data(dcfg(root=str(root), in_memory="true", cache_dir=str(tmp_path / "cache")))


def test_skip_bad_streaming_replaces_the_same_way_on_every_rank_and_counts(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "d", size=BIG, per_class=4, val_per_class=2)
    bad = [make_bad(root / "train" / "a" / "0001.jpg", "truncated"),
           make_bad(root / "train" / "c" / "0003.jpg", "zero_byte")]
    deny_reading(monkeypatch, root / "train" / "b" / "0000.jpg")
    batches = {}
    for world, workers in ((1, 1), (2, 0)):  # a worker process; two ranks decoding in-process
        data = load_data(stream_cfg(root, skip_bad=True, num_workers=workers))
        xs, ys = [], []
        for rank in range(world):
            got = list(data.host_batches(TrainLoader(data, 4, 3, rank, world, seed=0).plans(0)))
            xs.append(torch.cat([x for x, _ in got]))
            ys.append(torch.cat([y for _, y in got]))
        batches[world] = (xs, ys, data.bad.count())
    (x1,), (y1,), count1 = batches[1]
    assert count1 == 3 and x1.shape[0] == 12  # every sample is there, the bad ones replaced; 3 distinct files
    x2, y2, count2 = batches[2]
    assert count2 == 3
    per = 6  # each rank's share of every minibatch of 12 (one minibatch per epoch here)
    assert torch.equal(torch.cat([x2[0][:per], x2[1][:per]]), x1) and torch.equal(torch.cat(y2), y1)
    data = load_data(stream_cfg(root, skip_bad=True, num_workers=0))
    paths = data.train.paths
    i = paths.index(str(bad[0]))
    from lbsgd_cli.data.streaming import StreamingImages
    from lbsgd_cli.data.transforms import train_transform

    ds = StreamingImages(data.train, train_transform(data.dcfg), data.bad.marks["train"])
    x, y = ds[(i, 7)]
    nxt, _ = StreamingImages(data.train, train_transform(data.dcfg))[(i + 1, 7)]
    assert torch.equal(x, nxt) and y == data.train.labels[i + 1]  # the next file, with the sample's own seed


@pytest.mark.slow  # a streaming training run with loader workers
def test_skip_bad_run_reports_bad_files_in_the_header_and_metrics(tmp_path):
    root = make_image_tree(tmp_path / "d", size=BIG, per_class=4, val_per_class=2)
    make_bad(root / "train" / "b" / "0002.jpg", "truncated")
    make_bad(root / "train" / "c" / "folder.jpg", "not_a_file")
    run = tmp_path / "run"
    args = ["data=imagefolder", f"data.root={root}", "data.in_memory=false", "data.crop_size=32", "data.val_resize=36",
            "data.num_workers=1", "batch.k=2", "batch.n=3", "schedule.epochs=2", "schedule.warmup_epochs=0",
            "schedule.milestones=[1]", "model.width=8", "threads=1", "log.tensorboard=false", "log.progress=plain",
            f"hydra.run.dir={run}"]
    proc = lbsgd("train", *args)
    assert proc.returncode == 2 and "data.skip_bad=true" in proc.stderr and proc.stderr.count("\n") == 1
    proc = lbsgd("train", *args, "data.skip_bad=true")
    assert proc.returncode == 0, proc.stderr
    assert "data.skip_bad=true: 1 bad file(s) left out before training" in proc.stdout
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/bad_files"] for r in records if "val/err" in r] == [2, 2]  # the folder + the truncated file
    assert "bad files 2" in proc.stdout
    val = list(val_batches(load_data(stream_cfg(root, skip_bad=True, num_workers=0)), 0, 1, 4, torch.device("cpu")))
    assert sum(len(y) for _, y in val) == 6


def test_files_without_an_image_name_are_ignored(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    (root / "train" / "a" / "README.txt").write_text("notes")
    (root / "train" / "a" / ".hidden.jpg").write_bytes(b"")
    bad = BadData(skip=False)
    _, train, _ = scan_imagefolder(root, bad)
    assert len(train.paths) == 6 and not bad.left_out and not bad.notes


@pytest.mark.slow
def test_skip_bad_on_two_processes_trains_the_one_process_weights_and_counts_alike(tmp_path):
    """2 gloo processes (torchrun), each with a loader worker process, meet the bad files in other places than
    one process does; the replacements, the weights (bit for bit) and data/bad_files are the same."""
    from ..test_distributed import max_abs_diff, train

    root = make_image_tree(tmp_path / "d", size=BIG, per_class=4, val_per_class=2)
    make_bad(root / "train" / "a" / "0001.jpg", "truncated")
    make_bad(root / "train" / "b" / "0003.jpg", "zero_byte")
    make_bad(root / "val" / "c" / "0000.jpg", "not_an_image")
    args = ["data=imagefolder", f"data.root={root}", "data.in_memory=false", "data.crop_size=32", "data.val_resize=36",
            "data.num_workers=1", "data.skip_bad=true", "batch.k=2", "batch.n=3", "batch.workers_per_pass=1",
            "schedule.epochs=2", "schedule.warmup_epochs=1", "schedule.milestones=[1]", "model.width=8", "threads=1",
            "log.tensorboard=false", "log.progress=plain"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    proc = train(one, args)
    assert proc.returncode == 0, proc.stderr
    proc = train(two, args, processes=2)
    assert proc.returncode == 0, proc.stderr
    assert max_abs_diff(one, two) == 0.0  # bit for bit
    counts = [[json.loads(x)["data/bad_files"] for x in (d / "metrics.jsonl").read_text().splitlines()
               if "val/err" in x] for d in (one, two)]
    assert counts[0] == counts[1] == [3, 3]
