"""The streaming source for ImageNet-sized images: files decoded by DataLoader workers.

Workers (persistent, as many as ``data.num_workers``, ``auto``: :func:`resolve_num_workers`) apply the
paper's augmentation (§5.1, :mod:`lbsgd_cli.data.transforms`: scale and aspect-ratio crop, flip; a JPEG
decoded at reduced size where the crop allows, by libjpeg-turbo otherwise: :mod:`lbsgd_cli.data.decode`) and
deliver uint8 batches, which are copied to the device (pinned memory; on CUDA the next batch on a side
stream) and normalised there (:func:`device_batches`); one persistent train loader and one persistent val
loader per run. With ``data.decode=gpu`` the workers send the JPEG bytes and crop boxes instead
(:class:`~lbsgd_cli.data.transforms.RawCrop`) and the device decodes
(:func:`~lbsgd_cli.data.transforms.decode_on_device`), on a thread of its own one batch ahead (on CUDA, on a
stream of its own), so the training thread goes on launching the step's kernels while the decoder waits for
its stream.

Every draw comes from the sample's own generator, seeded from ``(seed, epoch, position)`` by the plan of its
iteration (:meth:`lbsgd_cli.data.sampling.BatchPlan.sample_seeds`, Remark 4, §3): never from the worker, the
process or the global RNG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .bad_data import MAX_REPLACEMENTS, BadData, bad_file_error, reason, replacement
from .sampling import BatchPlan
from .source import ImageList, mean_std, normalise
from .transforms import RawCrop, collate_raw, decode_on_device, decodes_on_device, train_transform, val_transform

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
        it is marked there and the sample is the next file that decodes (:mod:`lbsgd_cli.data.bad_data`)."""
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


class EpochBatches:
    """A batch sampler whose batches the source sets before each epoch (it runs in the main process)."""

    def __init__(self) -> None:
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class StreamingData:
    """An ImageFolder tree whose files the loader workers decode as they are needed (ImageNet-sized images)."""

    train: ImageList
    val: ImageList
    classes: list[str]
    dcfg: object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory = False
    in_channels = 3
    # the persistent loaders of this run: train, one per pinning (the sampler's batches set per epoch); val,
    # one per (share, batch size, pinning), built by the first evaluation and reused by every later one
    train_loaders: dict = field(default_factory=dict, repr=False, compare=False)
    val_loaders: dict = field(default_factory=dict, repr=False, compare=False)
    bad: BadData = field(default_factory=BadData)  # data.skip_bad: left out at listing, marked by workers

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            self.bad.new_marks(split, len(getattr(self, split).paths))
        # §5.1's training augmentation per file; its transform may be changed until the first epoch starts
        # the workers (scripts/bench/bench_gpu.py turns libjpeg-turbo off so)
        self.train_dataset = StreamingImages(self.train, train_transform(self.dcfg), self.bad.marks.get("train"))

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

    @property
    def device_decode_size(self) -> int:
        """The crop size the device decodes to under ``data.decode=gpu``; 0 when the workers decode."""
        return self.dcfg.crop_size if decodes_on_device(self.dcfg) else 0

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

    def train_batches(self, plans: list[BatchPlan], device: torch.device
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The plans' batches, decoded by the workers and normalised on ``device`` (the next one prefetched)."""
        mean, std = mean_std(self, device)
        yield from device_batches(self.host_batches(plans, device.type == "cuda"), device, mean, std,
                                  self.device_decode_size)

    def host_batches(self, plans: list[BatchPlan], pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The plans' uint8 ``(x, y)`` batches as the workers deliver them (before the device): one persistent
        loader per pinning, whose sampler gets the epoch's ``(index, sample seed)`` batches each time."""
        batches = [list(zip(plan.indices.tolist(), plan.sample_seeds())) for plan in plans]
        if pin not in self.train_loaders:
            sampler = EpochBatches()
            self.train_loaders[pin] = make_loader(self.train_dataset, sampler, self.num_workers, pin)
        loader = self.train_loaders[pin]
        loader.batch_sampler.batches = batches
        yield from loader

    def val_batches(self, lo: int, hi: int, batch_size: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Val images ``[lo, hi)``, decoded by the persistent val loader, normalised on ``device``."""
        mean, std = mean_std(self, device)
        yield from device_batches(self.val_loader(lo, hi, batch_size, device.type == "cuda"), device, mean, std,
                                  self.device_decode_size)

    def val_loader(self, lo: int, hi: int, batch_size: int, pin: bool) -> torch.utils.data.DataLoader:
        """The persistent loader of val images ``[lo, hi)`` in batches (uint8; built once per run)."""
        key = (lo, hi, batch_size, pin)
        if key not in self.val_loaders:
            keys = [(i, -1) for i in range(lo, hi)]
            batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
            dataset = StreamingImages(self.val, val_transform(self.dcfg), self.bad.marks.get("val"))
            self.val_loaders[key] = make_loader(dataset, batches, self.num_workers, pin)
        return self.val_loaders[key]

    def close(self) -> None:
        """Stops the persistent train loaders' workers (a benchmark's next row should not share the CPUs)."""
        for loader in self.train_loaders.values():
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


# --------------------------------------------------------------------------- loaders, device batches, workers


def make_loader(dataset, batch_sampler, workers: int, pin: bool) -> torch.utils.data.DataLoader:
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
    if decode_size:  # data.decode=gpu: the decoder on a thread of its own (and a stream: on CUDA)
        def decoded(raw, y):
            x = decode_on_device(raw, decode_size, device).mul_(scale).sub_(shift)
            return x, y.to(device, non_blocking=True)

        yield from _decoded_ahead(batches, decoded, device)
        return

    def norm(x: torch.Tensor) -> torch.Tensor:  # uint8 on the device
        return x.float().mul_(scale).sub_(shift)

    if not side_stream_prefetch(device):
        for x, y in batches:
            yield norm(x.to(device)), y.to(device)
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # scale and shift are made on the current stream

    def load(batch):
        x, y = batch
        with torch.cuda.stream(side):
            return norm(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

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
    side = torch.cuda.Stream(device) if side_stream_prefetch(device) else None
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


def side_stream_prefetch(device: torch.device) -> bool:
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


