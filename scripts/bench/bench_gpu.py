#!/usr/bin/env python
"""The ImageNet path on one GPU, measured in one command without ImageNet (issue 23).

    python scripts/bench/bench_gpu.py                       # one GPU, about 5 minutes; writes bench_gpu.{json,md}
    python scripts/bench/bench_gpu.py --per-core-only       # this CPU: the loader's img/s per core, new vs PIL
    python scripts/bench/bench_gpu.py --smoke               # CPU, tiny sizes, seconds (the test suite runs it)

1. **Data**: ``--images`` (20,000) ImageNet-like JPEGs generated into memory-backed storage (``/dev/shm``),
   in parallel: procedural pictures with a natural image's spectrum (1/f noise mixed across channels,
   smooth gradients, flat shapes, sensor noise), sizes and aspect ratios spread like ImageNet's (mostly
   500 px long sides at 4:3 or 3:2, a tail of smaller and larger ones; mean about 400x350), the JPEG
   quality calibrated on a sample so that the mean file is about 110 KB; one in 400 of each of the odd kinds
   ImageNet holds: grayscale, CMYK, progressive, PNG data named ``.JPEG``. Kept for the next run.
2. **Step alone**: ResNet-50 (1000 classes) with ghost BN over n = 32, 256 images per GPU (8 workers in one
   pass), :func:`lbsgd_cli.engine.train_step` on uint8 batches already on the device (normalised there as
   the loader does), per precision (fp32, bf16), memory format (NCHW, channels_last) and compile mode
   (eager; ``torch.compile`` for bf16 channels_last, see 5); plain BN over the 256 beside each.
3. **Loader alone**: :class:`lbsgd_cli.data.TrainLoader` batches on the device, per decode mode (``pil`` =
   the workers' decode before issue 23, ``cpu`` = libjpeg-turbo in the workers, ``gpu`` = the workers send
   bytes, the device decodes), with all the CPUs but one as workers; and per core: ``pil`` against ``cpu``
   as images per CPU second, in this process (no workers: this thread) and from one worker (its process),
   whole epochs of ``--per-core-images`` in alternating rounds, and the decode alone.
4. **End to end**: loader and step together (bf16, channels_last), per decode mode.
5. Last, while the run has taken under ``--compile-after-s`` (200 s): the compiled rows of 2.

On CUDA ``cudnn.benchmark`` is on (what ``deterministic=false`` runs; ``--deterministic``: off).

Each timed row reports ms per step or images/s, the GPU's idle share (1 - the steps' time on the GPU by
CUDA events / wall time), peak memory and the training thread's CPU ms per step. Everything uses lbsgd's
own modules (models, ghost BN, streaming loader, engine), so it measures the real path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lbsgd_cli.choices import Precision
from lbsgd_cli.config import DataConfig, ModelConfig, OptimConfig
from lbsgd_cli.data import TrainLoader, load_data
from lbsgd_cli.data.source import IMAGENET_MEAN, IMAGENET_STD
from lbsgd_cli.engine import StepPlan, train_step
from lbsgd_cli.models import build_model
from lbsgd_cli.optim import build_optimizer

ODD_EVERY = 400  # one in this many of each odd kind: grayscale, CMYK, progressive, PNG named .JPEG
ODD = {1: "grayscale", 2: "cmyk", 3: "progressive", 4: "png"}  # index % odd_every -> kind
TARGET_KB = 110.0

# --------------------------------------------------------------------------- ImageNet-like JPEGs

_BANK: tuple[np.ndarray, np.ndarray] | None = None
BANK_SIDE = 1280


def _bank(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per process, once: three 1/f^beta noise fields (beta 0.9, 1.1, 1.3) and a white-noise field to crop
    pictures from (an FFT per picture would cost 10x the rest)."""
    global _BANK
    if _BANK is None or _BANK[0].shape[1] != side:
        rng = np.random.default_rng(12345)
        fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
        f = np.sqrt(fx * fx + fy * fy)
        f[0, 0] = 1.0
        fields = []
        for beta in (0.9, 1.1, 1.3):
            amp = (f ** -beta).astype(np.float32)
            spec = amp * (rng.standard_normal(amp.shape, dtype=np.float32)
                          + 1j * rng.standard_normal(amp.shape, dtype=np.float32))
            x = np.fft.irfft2(spec, s=(side, side)).astype(np.float32)
            fields.append(x / x.std())
        _BANK = np.stack(fields), rng.standard_normal((side, side, 3), dtype=np.float32)
    return _BANK


def image_size(rng: np.random.Generator, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) spread like ImageNet's: long side 500 for about half, 160-500 or 500-1000 else;
    4:3, 3:2, 1:1 or 16:9; landscape 78 %."""
    u = rng.random()
    long = 500 if u < 0.45 else int(rng.integers(160, 500)) if u < 0.92 else int(rng.integers(500, 1000))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 16 / 9], p=[0.55, 0.2, 0.12, 0.13])
    long = max(16, int(long * scale))
    short = max(16, int(round(long / aspect)))
    return (long, short) if rng.random() < 0.78 else (short, long)


def picture(rng: np.random.Generator, width: int, height: int):
    """A procedural picture with a photograph's spectrum (see the module docstring) as a PIL image."""
    from PIL import Image, ImageDraw

    fields, noise = _bank(BANK_SIDE)
    side = fields.shape[1]
    chans = []
    for _ in range(3):
        k, y, x = rng.integers(0, len(fields)), rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
        chans.append(fields[k, y : y + height, x : x + width])
    mix = (rng.normal(0, 0.35, (3, 3)) + np.eye(3)).astype(np.float32) * np.float32(rng.uniform(25, 45))
    img = np.stack(chans, -1) @ mix
    img += np.linspace(0, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(-80, 80, 3).astype(np.float32)
    img += np.linspace(0, 1, height, dtype=np.float32)[:, None, None] * rng.uniform(-80, 80, 3).astype(np.float32)
    img += rng.uniform(60, 190, 3).astype(np.float32)
    y, x = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
    img += noise[y : y + height, x : x + width] * np.float32(rng.uniform(3, 8))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, width // 2 + 5)), y0 + int(rng.integers(4, height // 2 + 5))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def _save(im, path: Path, quality: int, kind: str | None) -> int:
    if kind == "grayscale":
        im = im.convert("L")
    elif kind == "cmyk":
        im = im.convert("CMYK")
    if kind == "png":
        im.save(path, "PNG")
    else:
        im.save(path, "JPEG", quality=quality, progressive=kind == "progressive")
    return path.stat().st_size


def _make_one(job: tuple) -> tuple[int, int, int]:
    """One file: (index, path, quality, seed, scale, odd_every) -> (bytes, width, height)."""
    index, path, quality, seed, scale, odd_every = job
    rng = np.random.default_rng((seed, index))
    w, h = image_size(rng, scale)
    return _save(picture(rng, w, h), Path(path), quality, ODD.get(index % odd_every)), w, h


def _sizes_at(job: tuple) -> list[int]:
    """Calibration: one picture's JPEG size at each quality."""
    import io

    index, qualities, seed, scale = job
    rng = np.random.default_rng((seed, index))
    im = picture(rng, *image_size(rng, scale))
    out = []
    for q in qualities:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        out.append(buf.tell())
    return out


def make_imagenet_like(root: Path, images: int, classes: int, *, scale: float = 1.0, seed: int = 0,
                       procs: int | None = None, target_kb: float = TARGET_KB, odd_every: int = ODD_EVERY) -> dict:
    """``root/{train,val}/cNNN/*.JPEG`` (val: 2 % more), generated in ``procs`` processes; kept for reuse."""
    marker = root / f".done-{images}-{classes}-{scale}-{seed}-{odd_every}"
    if marker.exists():
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    procs = procs or max(1, len(os.sched_getaffinity(0)))
    qualities = list(range(80, 99))
    with mp.get_context("fork").Pool(procs) as pool:
        sample = [i + 10**7 for i in range(96)]
        sizes = np.array(pool.map(_sizes_at, [(i, qualities, seed, scale) for i in sample]))
        # bytes per pixel at each quality, times the mean pixel count of the size distribution (a few
        # large images in a small sample would swing a plain mean of file sizes)
        pixels = [np.prod(image_size(np.random.default_rng((seed, i)), scale)) for i in sample]
        mean_pixels = np.mean([np.prod(image_size(np.random.default_rng((seed, i)), 1.0)) for i in range(20000)])
        mean_kb = sizes.sum(0) / np.sum(pixels) * mean_pixels / 1e3
        quality = qualities[int(np.argmin(np.abs(mean_kb - target_kb)))]
        val = max(classes, images // 50)
        jobs = []
        for split, count, offset in (("train", images, 0), ("val", val, images)):
            for c in range(classes):
                (root / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
            jobs += [(offset + i, str(root / split / f"c{i % classes:03d}" / f"{offset + i:06d}.JPEG"), quality, seed,
                      scale, odd_every) for i in range(count)]
        made = pool.map(_make_one, jobs, chunksize=64)
    made_train = np.array(made[:images])
    info = {"root": str(root), "train_images": images, "val_images": val, "classes": classes, "quality": quality,
            "mean_kb": round(float(made_train[:, 0].mean()) / 1e3, 1),
            "mean_width": round(float(made_train[:, 1].mean()), 1),
            "mean_height": round(float(made_train[:, 2].mean()), 1),
            "odd_files_each": sum(1 for i in range(images) if i % odd_every == 1), "odd_kinds": sorted(ODD.values()),
            "generate_s": round(time.perf_counter() - t0, 1), "processes": procs}
    marker.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- timing helpers


class Timer:
    """Wall time, this thread's CPU time and, on CUDA, the GPU time of the timed regions (events)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device, self.pairs = device, []

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def region(self):
        """Marks one step on the GPU's stream (start, end): the GPU is busy in between."""
        if not self.cuda:
            return _Null()
        return _Region(self.pairs)

    def stop(self, steps: int, images: int) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu
        out = {"ms_per_step": round(wall / steps * 1e3, 2), "img_per_s": round(images / wall, 1),
               "cpu_ms_per_step": round(cpu / steps * 1e3, 2)}
        if self.cuda:
            busy = sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3
            out["gpu_idle_share"] = round(max(0.0, 1 - busy / wall), 3)
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out

    def __exit__(self, *exc):
        return False


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Region:
    def __init__(self, pairs: list) -> None:
        self.pairs = pairs

    def __enter__(self):
        self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.a.record()
        return self

    def __exit__(self, *exc):
        self.b.record()
        self.pairs.append((self.a, self.b))
        return False


# --------------------------------------------------------------------------- sections


def _model(arch: str, classes: int, n: int | None, channels_last: bool, compile_: bool, device: torch.device):
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(arch=arch)), classes, 3, bn_group=n).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model.compile()
    return model


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.float().mul_(1 / (255 * std)).sub_(mean / std)


def step_alone(a, device: torch.device, precision: str, channels_last: bool, compile_: bool, ghost: bool) -> dict:
    """train_step on one uint8 batch already on the device, normalised there each step as the loader does."""
    k, n = (a.batch // a.n, a.n) if ghost else (1, a.batch)
    model = _model(a.arch, a.classes, n if ghost else None, channels_last, compile_, device)
    opt = build_optimizer(model, OmegaConf.structured(OptimConfig()), 0.1)
    plan = StepPlan(per_process=k, per_pass=k, n=n, loss_scale=1.0 / a.batch, precision=Precision(precision),
                    channels_last=channels_last)
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, a.classes, (a.batch,), generator=g).to(device)
    t0 = time.perf_counter()
    for _ in range(a.warmup + (2 if compile_ else 0)):
        train_step(model, opt, (_normalise(x8), y), plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    with Timer(device) as t:
        for _ in range(a.steps):
            with t.region():
                train_step(model, opt, (_normalise(x8), y), plan)
        row = t.stop(a.steps, a.steps * a.batch)
    row["warmup_s"] = round(first_s, 1)
    return row


def _data(a, decode: str, subset: int = 0):
    dcfg = OmegaConf.structured(DataConfig(name="imagefolder", root=a.root, in_memory="false", decode=decode,
                                           crop_size=a.size, val_resize=int(a.size * 8 / 7),
                                           num_workers=a.workers, train_subset=subset))
    return load_data(dcfg)


def _train_loader(a, decode: str, device: torch.device, workers=None, subset: int = 0) -> TrainLoader:
    """lbsgd's loader; ``decode=pil`` is ``cpu`` with libjpeg-turbo off (the workers' decode before issue 23)."""
    data = _data(a, "cpu" if decode == "pil" else decode, subset)
    if workers is not None:
        data.dcfg.num_workers = workers
    loader = TrainLoader(data, a.batch // a.n, a.n, 0, 1, seed=0, device=device)
    if decode == "pil":
        data.train_dataset.transform.turbo = False  # the workers fork after this: they decode with PIL
    return loader


def _close(loader: TrainLoader) -> None:
    """Stops a loader's persistent workers, so that they do not decode ahead during the next row."""
    loader.data.close()


def loader_alone(a, device: torch.device, decode: str) -> dict:
    loader = _train_loader(a, decode, device)
    it = loader.epoch(0)
    steps = min(a.loader_steps, len(loader) - 1)
    next(it)  # the workers start and fill their queues
    with Timer(device) as t:
        for _ in range(steps):
            x, _ = next(it)
        row = t.stop(steps, steps * x.shape[0])
    row["workers"] = loader.data.num_workers
    it.close()
    _close(loader)
    return row


MIN_TIMED_CPU_S = 0.1  # ten /proc ticks: a timed epoch's CPU time is at least this, so a rate is within ~10 %


def _proc_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes (``/proc/<pid>/stat``)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def per_core(a, device: torch.device) -> dict:
    """Images per CPU second of the decoding core, ``pil`` against ``cpu`` (libjpeg-turbo), each a whole epoch
    of TrainLoader's uint8 batches: in this process (``num_workers=0``: this thread's CPU time) and from one
    loader worker (its process's CPU time, read from /proc; the worker idles between epochs). CPU time, not
    wall time, so other jobs on the machine change the figures little. The sides alternate over ``--rounds``
    rounds (the order reversed every round); a ratio is the median of the ratios within a round."""
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: this thread's CPU time is then all the work
    try:
        return _per_core(a, cpu)
    finally:
        torch.set_num_threads(threads)


def _per_core(a, cpu: torch.device) -> dict:
    sides = {(d, w): _train_loader(a, d, cpu, workers=w, subset=a.per_core_images) for w in (0, 1)
             for d in ("pil", "cpu")}
    rates: dict = {key: [] for key in sides}
    for r in range(a.rounds):
        for key in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            loader, seen = sides[key], 0
            if key[1] == 1 and not loader.data.train_loaders:
                for _ in loader.data.host_batches(loader.plans(10**6 + r)):  # starts the persistent worker
                    pass  # (an untimed epoch)
            pids = [w.pid for w in loader.data.train_loaders[False]._iterator._workers] if key[1] == 1 else []
            clock = (lambda: _proc_cpu_s(pids)) if pids else time.thread_time
            cpu0, spent = clock(), 0.0
            while spent < MIN_TIMED_CPU_S:  # /proc counts 10 ms ticks: a tiny epoch repeats until measurable
                for x, _ in loader.data.host_batches(loader.plans(r)):
                    seen += x.shape[0]
                spent = clock() - cpu0
            rates[key].append(seen / spent)
    out = {}
    for w, label in ((0, "in_process_img_per_cpu_s"), (1, "one_worker_img_per_cpu_s")):
        ratio = [c / p for c, p in zip(rates[("cpu", w)], rates[("pil", w)])]
        out[label] = {"pil": round(statistics.median(rates[("pil", w)]), 1),
                      "cpu": round(statistics.median(rates[("cpu", w)]), 1),
                      "ratio_cpu_over_pil": round(statistics.median(ratio), 2),
                      "ratio_range": [round(min(ratio), 2), round(max(ratio), 2)]}
    for loader in sides.values():
        _close(loader)
    out["rounds"], out["images_per_side_round"] = a.rounds, len(sides[("cpu", 0)]) * a.batch
    out["decode_only_ms_per_image"] = decode_only(sides[("cpu", 0)].data.train.paths[:200], a.rounds)
    out["region_decode_ms_per_sample"] = region_decode(sides[("cpu", 0)].data.train.paths[:600], a.rounds, a.size)
    return out


def region_decode(paths: list, rounds: int, size: int, batch: int = 32) -> dict:
    """Decoding only the crop's region, where a library offers it: NVIDIA DALI's CPU decoder
    (``fn.decoders.image_slice``: libjpeg-turbo told the region, so it skips the IDCT outside it and stops
    after its last row) with lbsgd's own crop boxes, against today's sample (libjpeg-turbo's full decode,
    the crop, the resize to ``size``); CPU ms per sample (process CPU time, one DALI thread), alternating
    rounds, medians. ``{"skipped": ...}`` without ``nvidia-dali`` (``pip install nvidia-dali-cuda120``)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError:
        return {"skipped": "nvidia-dali is not installed"}
    import simplejpeg
    from PIL import Image

    from lbsgd_cli.data import decode
    from lbsgd_cli.data.transforms import RandomResizedCropDecode, resize_image

    crop, g = RandomResizedCropDecode(size), torch.Generator().manual_seed(0)
    files, boxes = [], []
    for p in paths:
        with Image.open(p) as im:
            if not decode.turbo_decodable(im):
                continue
            top, left, h, w = crop.box(im.height, im.width, g)
        files.append(np.fromfile(p, np.uint8))
        boxes.append((left, top, w, h))
    files, boxes = files[: len(files) // batch * batch], boxes[: len(files) // batch * batch]
    if not files:
        return {"skipped": f"fewer than {batch} files libjpeg-turbo takes"}

    def today() -> None:
        for f, (left, top, w, h) in zip(files, boxes):
            a = simplejpeg.decode_jpeg(f.tobytes(), colorspace="RGB")
            resize_image(torch.from_numpy(a[top:top + h, left:left + w].copy()).permute(2, 0, 1), [size, size])

    def sample(info):
        i = info.idx_in_epoch % len(files)
        left, top, w, h = boxes[i]
        return files[i], np.array([left, top], np.float32), np.array([w, h], np.float32)

    @dali.pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        enc, anchor, shape = fn.external_source(source=sample, num_outputs=3, batch=False,
                                                dtype=[types.UINT8, types.FLOAT, types.FLOAT])
        img = fn.decoders.image_slice(enc, anchor, shape, device="cpu", output_type=types.RGB, axis_names="WH",
                                      normalized_anchor=False, normalized_shape=False)
        return fn.resize(img, resize_x=size, resize_y=size)

    pipe = pipeline()
    pipe.build()

    def dali_region() -> None:
        for _ in range(len(files) // batch):
            pipe.run()

    times: dict = {"today": [], "dali_region": []}
    for r in range(rounds + 1):  # round 0 warms both up (caches, DALI's buffers) and is not counted
        for name, fn_ in (("today", today), ("dali_region", dali_region))[:: 1 if r % 2 == 0 else -1]:
            t = time.process_time()
            fn_()
            if r:
                times[name].append((time.process_time() - t) / len(files) * 1e3)
    ratio = [t / d for t, d in zip(times["today"], times["dali_region"])]
    return {"files": len(files), "dali": dali.__version__, "today": round(statistics.median(times["today"]), 3),
            "dali_region": round(statistics.median(times["dali_region"]), 3),
            "ratio_today_over_dali": round(statistics.median(ratio), 2)}


def decode_only(paths: list, rounds: int) -> dict:
    """The full decode alone, CPU ms per file: PIL (open, decode, RGB array) against libjpeg-turbo (the file's
    bytes, ``simplejpeg``'s decode), on the JPEGs libjpeg-turbo takes; alternating rounds, medians."""
    from PIL import Image

    from lbsgd_cli.data import decode

    files = []
    for p in paths:
        with Image.open(p) as im:
            if decode.turbo_decodable(im):
                files.append(p)

    def pil(p):
        with Image.open(p) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))

    def turbo(p):
        with Image.open(p) as im:
            return decode.decode_rgb(im)

    times: dict = {"pil": [], "turbo": []}
    for r in range(rounds):
        for name, fn in (("pil", pil), ("turbo", turbo))[:: 1 if r % 2 == 0 else -1]:
            t = time.thread_time()
            for p in files:
                fn(p)
            times[name].append((time.thread_time() - t) / max(1, len(files)) * 1e3)
    ratio = [p / t for p, t in zip(times["pil"], times["turbo"])]
    return {"files": len(files), "pil": round(statistics.median(times["pil"]), 3),
            "turbo": round(statistics.median(times["turbo"]), 3),
            "ratio_pil_over_turbo": round(statistics.median(ratio), 2)}


def end_to_end(a, device: torch.device, decode: str, precision: str, channels_last: bool) -> dict:
    model = _model(a.arch, a.classes, a.n, channels_last, False, device)
    opt = build_optimizer(model, OmegaConf.structured(OptimConfig()), 0.1)
    k = a.batch // a.n
    plan = StepPlan(per_process=k, per_pass=k, n=a.n, loss_scale=1.0 / a.batch, precision=Precision(precision),
                    channels_last=channels_last)
    loader = _train_loader(a, decode, device)
    it = loader.epoch(1)
    for _ in range(a.warmup):
        train_step(model, opt, next(it), plan)
    steps = min(a.e2e_steps, len(loader) - a.warmup)
    with Timer(device) as t:
        for _ in range(steps):
            batch = next(it)
            with t.region():
                train_step(model, opt, batch, plan)
        row = t.stop(steps, steps * a.batch)
    row["workers"] = loader.data.num_workers
    it.close()
    _close(loader)
    return row


# --------------------------------------------------------------------------- the command


def table(results: dict) -> str:
    """The markdown table of every timed row."""
    lines = ["| section | setting | ms/step | img/s | GPU idle | peak GiB | train-thread CPU ms/step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for section in ("step", "loader", "end_to_end"):
        for name, r in results.get(section, {}).items():
            if "error" in r:
                lines.append(f"| {section} | {name} | failed: {r['error']} | | | | |")
                continue
            lines.append(f"| {section} | {name} | {r['ms_per_step']} | {r['img_per_s']} | "
                         f"{r.get('gpu_idle_share', '')} | {r.get('peak_mem_gib', '')} | {r['cpu_ms_per_step']} |")
    pc = results.get("per_core")
    if pc:
        lines += ["", "| per core | pil | cpu (libjpeg-turbo) | cpu / pil | range |", "|---|---:|---:|---:|---|"]
        for label in ("in_process_img_per_cpu_s", "one_worker_img_per_cpu_s"):
            r = pc[label]
            lines.append(f"| {label} | {r['pil']} | {r['cpu']} | {r['ratio_cpu_over_pil']} | "
                         f"{r['ratio_range'][0]}-{r['ratio_range'][1]} |")
        d = pc["decode_only_ms_per_image"]
        lines.append(f"| decode alone, CPU ms per file ({d['files']} files) | {d['pil']} | {d['turbo']} | "
                     f"{d['ratio_pil_over_turbo']} (pil / turbo) | |")
        r = pc.get("region_decode_ms_per_sample", {})
        if "skipped" not in r and r:
            lines.append(f"| crop region only (DALI {r['dali']}), CPU ms per sample ({r['files']} files) | | "
                         f"today {r['today']}, region {r['dali_region']} | {r['ratio_today_over_dali']} "
                         "(today / region) | |")
    return "\n".join(lines)


def _guarded(results: dict, section: str, name: str, fn, *args) -> None:
    """Runs one row; a failure (out of memory, a compile error) is recorded in its row, the rest still run."""
    print(f"[{time.strftime('%H:%M:%S')}] {section}: {name}", flush=True)
    try:
        results.setdefault(section, {})[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one row's failure must not lose the others
        results.setdefault(section, {})[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, a couple of steps (the test suite)")
    p.add_argument("--per-core-only", action="store_true", help="only the data and the per-core loader rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--root", default=None, help="where the JPEGs go (default /dev/shm/lbsgd_bench_imagenet)")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256, help="images per GPU")
    p.add_argument("--n", type=int, default=32, help="the ghost BN batch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=15, help="timed steps per step-alone row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-steps", type=int, default=25)
    p.add_argument("--e2e-steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="per-core rounds")
    p.add_argument("--per-core-images", type=int, default=1536, help="per-core epochs: this many images (0 = all)")
    p.add_argument("--workers", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--deterministic", action="store_true", help="cudnn.benchmark off (deterministic=true)")
    p.add_argument("--compile-after-s", type=float, default=200,
                   help="the compiled rows start only while the run has taken less than this (the 6-minute budget)")
    p.add_argument("--out", default="bench_gpu", help="writes OUT.json and OUT.md")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.images, a.classes, a.arch, a.batch, a.n, a.size = "cpu", 24, 3, "resnet18", 4, 2, 32
        a.steps, a.warmup, a.loader_steps, a.e2e_steps, a.rounds = 1, 1, 2, 2, 2
        a.workers, a.no_compile, a.scale, a.per_core_images = 0, True, 0.2, 0
    else:
        a.scale = 1.0
    if a.root is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        a.root = f"{base}/lbsgd_bench_imagenet{'_smoke' if a.smoke else ''}"
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.smoke:
        torch.set_num_threads(1)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    results: dict = {"args": {k: v for k, v in vars(a).items()}, "torch": torch.__version__,
                     "host": platform.node(), "cpu": _cpu_model(), "cpus": len(os.sched_getaffinity(0))}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        # what deterministic=false (and auto on a GPU) runs: cuDNN picks the fastest kernels per shape
        torch.backends.cudnn.benchmark = not a.deterministic
        results["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    results["data"] = make_imagenet_like(Path(a.root), a.images, a.classes, scale=a.scale,
                                         odd_every=8 if a.smoke else ODD_EVERY)
    print(f"data: {json.dumps(results['data'])}", flush=True)
    results["per_core"] = per_core(a, device)
    if not a.per_core_only:
        variants = [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]
        for precision, cl in variants:
            for ghost in (True, False):
                bn = f"ghost BN n={a.n}" if ghost else "plain BN"
                name = f"{precision} {'channels_last' if cl else 'NCHW'} eager {bn}"
                _guarded(results, "step", name, step_alone, a, device, precision, cl, False, ghost)
        modes = ["pil", "cpu"] + (["gpu"] if device.type == "cuda" or a.smoke else [])
        for mode in modes:
            _guarded(results, "loader", f"decode={mode}", loader_alone, a, device, mode)
        for mode in modes[1:]:
            _guarded(results, "end_to_end", f"decode={mode} bf16 channels_last eager ghost BN n={a.n}", end_to_end,
                     a, device, mode, "bf16", True)
        if not a.no_compile:  # last: compiling ResNet-50 takes a minute or two
            for ghost in (True, False):
                name = f"bf16 channels_last compiled {'ghost BN n=' + str(a.n) if ghost else 'plain BN'}"
                if time.perf_counter() - t0 > a.compile_after_s:
                    results["step"][name] = {"error": f"skipped: over {a.compile_after_s} s (--compile-after-s)"}
                    continue
                _guarded(results, "step", name, step_alone, a, device, "bf16", True, True, ghost)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    md = table(results)
    Path(f"{a.out}.json").write_text(json.dumps(results, indent=1))
    Path(f"{a.out}.md").write_text(md + "\n")
    print(md)
    print(f"total {results['total_s']} s; wrote {a.out}.json and {a.out}.md")
    return results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
