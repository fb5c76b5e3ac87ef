"""Data: Remark 4's shuffle, W-invariant shares, augmentation, ImageFolder trees and their errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig, check_num_workers
from lbsgd_cli.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InMemoryData,
    RandomResizedCropDecode,
    ResizeCenterCropDecode,
    StreamingData,
    TrainLoader,
    _mix,
    augment_batch,
    epoch_permutation,
    load_data,
    normalise,
    process_slice,
    resolve_num_workers,
    scan_imagefolder,
    stratified_subset,
    val_batches,
)
from lbsgd_cli.errors import UserError

from .conftest import make_image_tree


def dcfg(**kw):
    return OmegaConf.structured(DataConfig(**{"name": "imagefolder", **kw}))


def test_one_permutation_per_epoch_same_for_every_process_count():
    p0, p0b, p1 = epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 1)
    assert torch.equal(p0, p0b) and not torch.equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(100))


def test_process_shares_tile_the_global_minibatch():
    k, n = 8, 4
    for world in (1, 2, 4, 8):
        parts = [process_slice(k, n, r, world) for r in range(world)]
        covered = [i for s in parts for i in range(s.start, s.stop)]
        assert covered == list(range(k * n))


def _digits_loader(rank, world, k=4, n=8):
    data = load_data(OmegaConf.structured(DataConfig(name="digits", pad=1, flip=False)))
    return TrainLoader(data, k, n, rank, world, seed=3, device=torch.device("cpu"))


def test_two_processes_see_exactly_the_one_process_batches():
    one = list(_digits_loader(0, 1).epoch(2))
    r0, r1 = list(_digits_loader(0, 2).epoch(2)), list(_digits_loader(1, 2).epoch(2))
    assert len(one) == len(r0) == 1437 // 32  # last incomplete minibatch dropped
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        torch.testing.assert_close(x, torch.cat([x0, x1]), rtol=0, atol=0)
        assert torch.equal(y, torch.cat([y0, y1]))


def test_resume_mid_epoch_yields_the_remaining_batches():
    full = list(_digits_loader(0, 1).epoch(1))
    rest = list(_digits_loader(0, 1).epoch(1, start_iter=5))
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], rest))


def test_every_sample_at_most_once_per_epoch():
    loader = _digits_loader(0, 1, k=2, n=16)
    perm = epoch_permutation(loader.data.train_size, 3, 0)
    seen = torch.cat([loader.batch_indices(0, it, perm) for it in range(len(loader))])
    assert len(set(seen.tolist())) == len(seen) == len(loader) * 32


def test_augment_pad_crop_and_flip():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    same = augment_batch(x, torch.tensor([[1, 1], [1, 1]]), torch.tensor([False, False]), 1, True)
    assert torch.equal(same, x)  # offset = pad: the original image
    shifted = augment_batch(x, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, True]), 1, True)
    assert shifted[0, 0, 0].tolist() == [0, 0, 0] and shifted[0, 0, 1].tolist() == [0, 0, 1]
    assert shifted[1, 0, 0].tolist() == [0, 14, 13]  # shifted down-right, then flipped


def test_small_imagefolder_is_decoded_in_memory(tmp_path):
    root = make_image_tree(tmp_path / "d", size=16)
    data = load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert isinstance(data, InMemoryData)
    assert data.train.x.shape == (24, 3, 16, 16) and data.val_size == 12 and data.classes == ["a", "b", "c"]
    assert list((tmp_path / "cache").glob("*.pt"))  # decoded once, cached
    again = load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert torch.equal(again.train.x, data.train.x)
    xb, yb = next(val_batches(data, 0, 1, 5, torch.device("cpu")))
    assert xb.shape == (5, 3, 16, 16) and xb.dtype == torch.float32


def test_large_imagefolder_streams_with_paper_augmentation(tmp_path):
    root = make_image_tree(tmp_path / "d", size=80, per_class=4, val_per_class=2)
    cfg = dcfg(root=str(root), crop_size=64, val_resize=72, num_workers=0)
    data = load_data(cfg)
    assert isinstance(data, StreamingData)
    loader = TrainLoader(data, 2, 2, 0, 1, seed=0, device=torch.device("cpu"))
    batches = list(loader.epoch(0))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 64, 64)
    again = list(TrainLoader(data, 2, 2, 0, 1, seed=0, device=torch.device("cpu")).epoch(0))
    assert torch.equal(batches[1][0], again[1][0])  # augmentation seeded per sample
    xv, _ = next(val_batches(data, 0, 1, 6, torch.device("cpu")))
    assert xv.shape == (6, 3, 64, 64)


def test_train_and_val_subsets_are_stratified_in_memory_and_streaming(tmp_path):
    root = make_image_tree(tmp_path / "d", size=16, per_class=8, val_per_class=4)
    for extra in ({"cache_dir": str(tmp_path / "cache")}, {"in_memory": "false", "num_workers": 0}):
        data = load_data(dcfg(root=str(root), train_subset=12, val_subset=6, **extra))
        assert data.val_size == 6
        labels = [int(y) for _, yb in val_batches(data, 0, 1, 6, torch.device("cpu")) for y in yb]
        assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_stratified_subset_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    sub = stratified_subset(labels, 10)
    assert [sum(labels[i] == c for i in sub) for c in range(3)] == [5, 3, 2]


@pytest.mark.parametrize("breakage,message", [
    ("missing", "does not exist"),
    ("no_train", "has no train/ folder"),
    ("empty_class", "has no images"),
    ("val_extra_class", "val/ has classes that train/ lacks"),
])
def test_bad_trees_are_one_line_errors(tmp_path, breakage, message):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    if breakage == "missing":
        root = tmp_path / "nope"
    elif breakage == "no_train":
        import shutil
        shutil.rmtree(root / "train")
    elif breakage == "empty_class":
        for f in (root / "train" / "b").iterdir():
            f.unlink()
    elif breakage == "val_extra_class":
        (root / "val" / "zzz").mkdir()
    with pytest.raises(UserError, match=message) as info:
        scan_imagefolder(root)
    assert "\n" not in str(info.value)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    bad = root / "train" / "a" / "0001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="0001.jpg") as info:
        load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the streaming loader (issue 13)


def _former_train_transform(size, flip=True):
    """The streaming training transform before issue 13 (float32 per image in the workers)."""
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _former_val_transform(resize, crop):
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(crop),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _former(path, transform, seed=-1):
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    if seed >= 0:
        torch.manual_seed(seed)
    return transform(img)


def _mean_std():
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 353), (80, 80), (40, 400), (400, 40), (224, 224)])
def test_crop_boxes_and_flips_are_torchvisions_draw_for_draw(height, width):
    from torchvision.transforms import v2

    ours, theirs = RandomResizedCropDecode(224), v2.RandomResizedCrop(224, antialias=True)
    probe = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(300):
        torch.manual_seed(_mix(7, seed))
        p = theirs.make_params([probe])
        flip_then = torch.rand(1).item() < 0.5  # v2.RandomHorizontalFlip's draw comes after the crop's
        g = torch.Generator().manual_seed(_mix(7, seed))
        assert ours.box(height, width, g) == (p["top"], p["left"], p["height"], p["width"])
        assert (torch.rand(1, generator=g).item() < 0.5) == flip_then


def test_training_and_val_samples_equal_the_former_float_pipeline(tmp_path):
    """uint8 from the workers, normalised per batch on the device == the former per-image float32 path."""
    root = make_image_tree(tmp_path / "d", size=80, per_class=4, val_per_class=2)
    data = load_data(dcfg(root=str(root), crop_size=64, val_resize=72, num_workers=0))
    loader = TrainLoader(data, 2, 2, 0, 1, seed=5, device=torch.device("cpu"))
    former = _former_train_transform(64)
    mean, std = _mean_std()
    for epoch in (0, 1):
        perm = epoch_permutation(data.train_size, 5, epoch)
        for it, (x, _) in enumerate(loader.epoch(epoch)):
            idx = loader.batch_indices(epoch, it, perm).tolist()
            ref = torch.stack([_former(data.train.paths[i], former, _mix(5, epoch, it * 4 + p))
                               for p, i in enumerate(idx)])
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    xv, _ = next(val_batches(data, 0, 1, 6, torch.device("cpu")))
    ref = torch.stack([_former(p, _former_val_transform(72, 64)) for p in data.val.paths[:6]])
    torch.testing.assert_close(xv, ref, rtol=0, atol=1e-5)
    # the file-level transforms, on a larger JPEG, with reduced decoding off: the same pixels exactly
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.fromarray(_smooth_image(375, 500).numpy()).save(big, quality=90)
    train_former = _former_train_transform(224)
    for seed in range(20):
        with Image.open(big) as im:
            ours = RandomResizedCropDecode(224, draft=False)(im, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(normalise(ours[None], mean, std)[0], _former(big, train_former, seed),
                                   rtol=0, atol=1e-5)
    with Image.open(big) as im:
        ours = ResizeCenterCropDecode(256, 224, draft=False)(im)
    torch.testing.assert_close(normalise(ours[None], mean, std)[0], _former(big, _former_val_transform(256, 224)),
                               rtol=0, atol=1e-5)


def _smooth_image(height, width):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([xx, yy, (torch.sin(6 * xx) * torch.cos(5 * yy) + 1) / 2], dim=-1)
    return (img * 255).round().to(torch.uint8)


def test_reduced_jpeg_decoding_only_where_the_crop_stays_at_least_the_output_size(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(_smooth_image(900, 1200).numpy()).save(path, quality=92)
    used = {1: 0, 2: 0, 4: 0, 8: 0}
    for size in (224, 64):
        crop = RandomResizedCropDecode(size)
        for seed in range(60):
            g = torch.Generator().manual_seed(seed)
            with Image.open(path) as im:
                top, left, h, w = box = crop.box(900, 1200, g)
                s = crop.draft_scale(im, box)
                used[s] += 1
                assert min(w, h) / s >= size  # the box decoded at 1/s is still at least the output size
                assert s == 8 or min(w, h) / (2 * s) < size  # and it is the largest such scale
                x = crop(im, torch.Generator().manual_seed(seed))
                decoded = im.size
            assert decoded == ((1200 + s - 1) // s, (900 + s - 1) // s)  # PIL's draft decoded at 1/s
            with Image.open(path) as im:
                full = RandomResizedCropDecode(size, draft=False)(im, torch.Generator().manual_seed(seed))
            assert x.shape == full.shape == (3, size, size) and x.dtype == torch.uint8
            # the same region of the photo: reduced decoding differs by resampling error only
            assert (x.float() - full.float()).abs().mean() < 4, seed
    assert all(used.values()), used  # every scale occurs
    # a PNG is never reduced
    png = tmp_path / "big.png"
    Image.fromarray(_smooth_image(1200, 1600).numpy()).save(png)
    with Image.open(png) as im:
        assert crop.draft_scale(im, (0, 0, 1200, 1600)) == 1


def test_val_decoding_is_reduced_only_while_the_shorter_side_stays_at_least_val_resize(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(_smooth_image(600, 900).numpy()).save(path, quality=92)
    for resize, scale in ((256, 2), (150, 4), (300, 2), (301, 1)):
        with Image.open(path) as im:
            x = ResizeCenterCropDecode(resize, 128)(im)
            assert im.size[1] == 600 // scale
        with Image.open(path) as im:
            full = ResizeCenterCropDecode(resize, 128, draft=False)(im)
        assert x.shape == (3, 128, 128) and (x.float() - full.float()).abs().mean() < 3


def test_the_val_loader_is_built_once_per_run(tmp_path):
    root = make_image_tree(tmp_path / "d", size=80, per_class=2, val_per_class=3)
    data = load_data(dcfg(root=str(root), crop_size=64, val_resize=72, num_workers=1))
    first = [x for x, _ in val_batches(data, 0, 1, 4, torch.device("cpu"))]
    loader = next(iter(data.val_loaders.values()))
    workers = loader._iterator._workers
    second = [x for x, _ in val_batches(data, 0, 1, 4, torch.device("cpu"))]
    assert len(data.val_loaders) == 1 and next(iter(data.val_loaders.values())) is loader
    assert loader.persistent_workers and loader._iterator._workers is workers  # the same worker processes
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and [len(x) for x in first] == [4, 4, 1]


@pytest.mark.parametrize("env,affinity,workers", [
    ({}, 16, 15),  # this process's CPUs, less one for training
    ({}, 2, 1),
    ({}, 1, 0),  # a single CPU: the training process decodes
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 3),  # torchrun: local ranks share the affinity
    ({"SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS_PER_NODE": "8"}, 80, 9),  # srun: a task per rank
    ({"SLURM_CPUS_PER_TASK": "80", "SLURM_NTASKS_PER_NODE": "1", "LOCAL_WORLD_SIZE": "8"}, 80, 9),  # torchrun in srun
    ({"SLURM_CPUS_PER_TASK": "10"}, 4, 3),  # never more than the affinity
    ({"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "2"}, 64, 0),
])
def test_num_workers_auto_counts_this_process_cpus(env, affinity, workers):
    assert resolve_num_workers("auto", env, affinity) == workers
    assert resolve_num_workers(3, env, affinity) == 3 and resolve_num_workers("5", env, affinity) == 5


def test_num_workers_auto_reads_the_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    for key in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_num_workers("auto") == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert resolve_num_workers("auto") == 2
    assert DataConfig(name="imagefolder").num_workers == "auto"


@pytest.mark.parametrize("value,ok", [("auto", True), (0, True), (8, True), ("8", True), (-1, False),
                                      ("many", False), (True, False), (1.5, False)])
def test_num_workers_is_auto_or_a_count(value, ok):
    if ok:
        check_num_workers(value)
    else:
        with pytest.raises(UserError, match="data.num_workers"):
            check_num_workers(value)


def test_device_batches_prefetch_on_a_side_stream_with_cuda_stubbed(monkeypatch):
    """The CUDA path's order on the CPU: batch i+1 is issued on the side stream before batch i is handed
    over; the training stream waits for the side stream and records each batch it takes."""
    import contextlib

    import lbsgd_cli.data as D

    events = []

    class FakeStream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    main = FakeStream("main")
    current = [main]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(D, "_side_stream_prefetch", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: events.append(f"record {stream.name}"),
                        raising=False)
    batches = [(torch.full((2, 3, 4, 4), 10 * i, dtype=torch.uint8), torch.tensor([i, i])) for i in range(3)]

    def source():
        for i, b in enumerate(batches):
            events.append(f"load {i} on {current[-1].name}")
            yield b

    mean, std = _mean_std()
    got = []
    for x, y in D.device_batches(source(), torch.device("cpu"), mean, std):
        events.append(f"train {int(y[0])}")
        got.append((x, y))
    assert events == ["side waits main", "load 0 on main",
                      "main waits side", "record main", "record main", "load 1 on main", "train 0",
                      "main waits side", "record main", "record main", "load 2 on main", "train 1",
                      "main waits side", "record main", "record main", "train 2"]
    for (x, y), (xu, yu) in zip(got, batches):
        torch.testing.assert_close(x, normalise(xu, mean, std), rtol=0, atol=1e-5)
        assert torch.equal(y, yu)


def test_decode_on_the_device_matches_the_worker_decode_with_the_cpu_as_device(tmp_path):
    """data.decode=gpu tested with the CPU as the device: the same boxes and flips, other resampling."""
    from lbsgd_cli.data import RawCrop

    root = make_image_tree(tmp_path / "d", size=80, per_class=4, val_per_class=2)
    common = dict(root=str(root), crop_size=64, val_resize=72, num_workers=0)
    cpu, gpu = load_data(dcfg(**common)), load_data(dcfg(decode="gpu", **common))
    a = list(TrainLoader(cpu, 2, 2, 0, 1, seed=1).epoch(0))
    b = list(TrainLoader(gpu, 2, 2, 0, 1, seed=1).epoch(0))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.shape == xa.shape and xb.dtype == torch.float32 and torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 0.1  # ~5/255 after normalisation: resampling differences only
    va = torch.cat([x for x, _ in val_batches(cpu, 0, 1, 4, torch.device("cpu"))])
    vb = torch.cat([x for x, _ in val_batches(gpu, 0, 1, 4, torch.device("cpu"))])
    assert va.shape == vb.shape and (va - vb).abs().mean() < 0.1
    # on a smooth photo-like JPEG the two decodes agree closely (a box off by 8 px differs by ~6 of 255)
    from PIL import Image

    from lbsgd_cli.data import collate_raw, decode_on_device

    path = tmp_path / "smooth.jpg"
    Image.fromarray(_smooth_image(375, 500).numpy()).save(path, quality=92)
    full = RandomResizedCropDecode(224, draft=False)
    for seed in range(10):
        with Image.open(path) as im:
            ref = full(im, torch.Generator().manual_seed(seed)).float()
        with Image.open(path) as im:
            raw = RawCrop(train=full)(im, torch.Generator().manual_seed(seed))
        got = decode_on_device(collate_raw([(raw, 0)])[0], 224, torch.device("cpu"))[0]
        assert (ref - got).abs().mean() < 1.0
    crop = RandomResizedCropDecode(64)
    for seed in range(50):
        box, flip = RawCrop(train=crop).box(80, 60, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = crop.box(60, 80, g)
        assert box == (left, top, left + w, top + h) and flip == (torch.rand(1, generator=g).item() < 0.5)
