"""The streaming source: files decoded by persistent workers into the former float pipeline's samples, worker
counts, device prefetch (CUDA stubbed) and data.decode=gpu's helper thread; a sample depends on its seed,
epoch and position only."""

from __future__ import annotations

import pytest
import torch

from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import TrainLoader, load_data, val_batches
from lbsgd_cli.data.sampling import mix_seed
from lbsgd_cli.data.source import IMAGENET_MEAN, IMAGENET_STD, normalise
from lbsgd_cli.data.streaming import StreamingData, resolve_num_workers
from lbsgd_cli.data.transforms import RandomResizedCropDecode, RawCrop, ResizeCenterCropDecode, collate_raw
from lbsgd_cli.errors import UserError
from lbsgd_cli.validation import check_num_workers

from ..conftest import make_image_tree
from .conftest import dcfg, smooth_image


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


def test_training_and_val_samples_equal_the_former_float_pipeline(tmp_path):
    """uint8 from the workers, normalised per batch on the device == the former per-image float32 path."""
    root = make_image_tree(tmp_path / "d", size=80, per_class=4, val_per_class=2)
    data = load_data(dcfg(root=str(root), crop_size=64, val_resize=72, num_workers=0))
    loader = TrainLoader(data, 2, 2, 0, 1, seed=5, device=torch.device("cpu"))
    former = _former_train_transform(64)
    mean, std = _mean_std()
    for epoch in (0, 1):
        plans = loader.plans(epoch)
        for it, (x, _) in enumerate(loader.epoch(epoch)):
            idx = plans[it].indices.tolist()
            ref = torch.stack([_former(data.train.paths[i], former, mix_seed(5, epoch, it * 4 + p))
                               for p, i in enumerate(idx)])
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    xv, _ = next(val_batches(data, 0, 1, 6, torch.device("cpu")))
    ref = torch.stack([_former(p, _former_val_transform(72, 64)) for p in data.val.paths[:6]])
    torch.testing.assert_close(xv, ref, rtol=0, atol=1e-5)
    # the file-level transforms, on a larger JPEG, with reduced decoding off: the same pixels exactly
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.fromarray(smooth_image(375, 500).numpy()).save(big, quality=90)
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


def stub_cuda_streams(monkeypatch, events: list[str]):
    """CUDA's streams stubbed on the CPU, for the prefetch paths of ``lbsgd_cli.data.streaming``: each thread's
    current stream (``main`` until ``torch.cuda.stream`` enters another), ``wait_stream`` and ``record_stream``
    written to ``events``. Returns the current-stream function."""
    import contextlib
    import threading

    import lbsgd_cli.data.streaming as S

    local = threading.local()

    class FakeStream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    main = FakeStream("main")

    def current(device=None):
        return getattr(local, "stack", [main])[-1]

    @contextlib.contextmanager
    def on(stream):
        local.stack = [*getattr(local, "stack", [main]), stream]
        yield
        local.stack.pop()

    monkeypatch.setattr(S, "side_stream_prefetch", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: events.append(f"record {stream.name}"),
                        raising=False)
    return current


def test_device_batches_prefetch_on_a_side_stream_with_cuda_stubbed(monkeypatch):
    """The CUDA path's order on the CPU: batch i+1 is issued on the side stream before batch i is handed
    over; the training stream waits for the side stream and records each batch it takes."""
    import lbsgd_cli.data.streaming as S

    events: list[str] = []
    current = stub_cuda_streams(monkeypatch, events)
    batches = [(torch.full((2, 3, 4, 4), 10 * i, dtype=torch.uint8), torch.tensor([i, i])) for i in range(3)]

    def source():
        for i, b in enumerate(batches):
            events.append(f"load {i} on {current().name}")
            yield b

    mean, std = _mean_std()
    got = []
    for x, y in S.device_batches(source(), torch.device("cpu"), mean, std):
        events.append(f"train {int(y[0])}")
        got.append((x, y))
    assert events == ["side waits main", "load 0 on main",
                      "main waits side", "record main", "record main", "load 1 on main", "train 0",
                      "main waits side", "record main", "record main", "load 2 on main", "train 1",
                      "main waits side", "record main", "record main", "train 2"]
    for (x, y), (xu, yu) in zip(got, batches):
        torch.testing.assert_close(x, normalise(xu, mean, std), rtol=0, atol=1e-5)
        assert torch.equal(y, yu)


def test_decode_gpu_runs_on_a_helper_thread_and_stream_in_order_with_cuda_stubbed(tmp_path, monkeypatch):
    """data.decode=gpu: batch i+1 is decoded on the helper thread, on the side stream, while batch i trains;
    the training stream waits for the side stream and records the batch; the batches equal a plain decode on
    this thread, in order; a JPEG the decoder refuses is one line on the training thread."""
    import threading

    from PIL import Image

    import lbsgd_cli.data.streaming as S

    events: list[str] = []
    current = stub_cuda_streams(monkeypatch, events)
    real = S.decode_on_device
    started = [threading.Event() for _ in range(3)]

    def decode(raw, size, device):
        events.append(f"decode on {threading.current_thread().name.split('_')[0]} {current().name}")
        for e in started:  # the first not set yet
            if not e.is_set():
                e.set()
                break
        return real(raw, size, device)

    monkeypatch.setattr(S, "decode_on_device", decode)
    raws = []
    for i, (h, w) in enumerate(((60, 80), (80, 60), (60, 80))):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(smooth_image(h, w).numpy()).save(path, quality=90)
        with Image.open(path) as im:
            raws.append(RawCrop(train=RandomResizedCropDecode(32))(im, torch.Generator().manual_seed(i)))
    batches = [collate_raw([(raws[i], i), (raws[(i + 1) % 3], i)]) for i in range(3)]
    mean, std = _mean_std()
    got = []
    for x, y in S.device_batches(iter(batches), torch.device("cpu"), mean, std, decode_size=32):
        i = int(y[0])
        if i < 2:  # batch i+1 is being decoded while batch i trains (it was issued before i was handed over)
            assert started[i + 1].wait(timeout=30)
        events.append(f"train {i}")
        got.append(x)
    on_main = [e for e in events if not e.startswith("decode")]
    assert on_main == ["side waits main", "main waits side", "record main", "record main", "train 0",
                       "main waits side", "record main", "record main", "train 1",
                       "main waits side", "record main", "record main", "train 2"]
    decodes = [i for i, e in enumerate(events) if e.startswith("decode")]
    handovers = [i for i, e in enumerate(events) if e == "main waits side"]
    assert [events[i] for i in decodes] == ["decode on lbsgd-decode side"] * 3
    assert all(d < h for d, h in zip(decodes, handovers))  # each batch decoded before it is taken
    scale, shift = 1.0 / (255.0 * std), mean / std
    for x, (raw, _) in zip(got, batches):
        assert torch.equal(x, real(raw, 32, torch.device("cpu")).mul_(scale).sub_(shift))
    bad = collate_raw([((torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg"), dtype=torch.uint8),
                           torch.tensor([0.0, 0.0, 8.0, 8.0]), False), 0)])
    with pytest.raises(UserError, match="data.decode=gpu: cannot decode a JPEG of this batch"):
        list(S.device_batches(iter([batches[0], bad, batches[1]]), torch.device("cpu"), mean, std, decode_size=32))


def test_a_samples_crop_and_flip_depend_on_seed_epoch_and_position_only(tmp_path):
    """Remark 4: the same samples, pixel for pixel, from 0 or 2 loader workers and from 1 or 2 processes
    (each process's share equals its slice of the one-process batch), with libjpeg-turbo decoding."""
    root = make_image_tree(tmp_path / "d", size=120, per_class=4, val_per_class=1)
    ref = None
    for workers in (0, 2):
        data = load_data(dcfg(root=str(root), crop_size=48, val_resize=56, num_workers=workers))
        one = TrainLoader(data, 2, 2, 0, 1, seed=3, device=torch.device("cpu"))
        batches = [x for epoch in (0, 1) for x, _ in data.host_batches(one.plans(epoch))]
        if ref is None:
            ref = batches
        assert all(torch.equal(a, b) for a, b in zip(batches, ref)) and len(batches) == len(ref) == 6
        for rank in (0, 1):
            share = TrainLoader(data, 2, 2, rank, 2, seed=3, device=torch.device("cpu"))
            mine = [x for epoch in (0, 1) for x, _ in data.host_batches(share.plans(epoch))]
            assert all(torch.equal(a, b[share.plans(0)[0].part]) for a, b in zip(mine, ref))


def test_device_batches_without_cuda_copy_and_normalise_each_uint8_batch_in_order():
    """Without a CUDA side stream each uint8 batch is copied to the device and normalised there, in order."""
    import lbsgd_cli.data.streaming as S

    batches = [(torch.full((2, 3, 4, 4), 40 * i, dtype=torch.uint8), torch.tensor([i, i])) for i in range(3)]
    mean, std = _mean_std()
    got = list(S.device_batches(iter(batches), torch.device("cpu"), mean, std))
    assert len(got) == 3
    for (x, y), (xu, yu) in zip(got, batches):
        assert x.dtype == torch.float32 and torch.equal(y, yu)
        torch.testing.assert_close(x, normalise(xu, mean, std), rtol=0, atol=1e-5)
