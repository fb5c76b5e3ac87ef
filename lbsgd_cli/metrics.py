"""Metrics: top-k error, ``metrics.jsonl``, TensorBoard, peak device memory, and the progress display.

Only rank 0 writes. Per-iteration records (``iter``, ``epoch``, ``lr``,
``train/loss``) come every ``log.every`` iterations, per-epoch records
(``epoch``, ``train/err``, ``val/err``, ``val/top5_err``, ``images_per_sec``...)
at each epoch's end; errors are fractions. A resumed run appends, after dropping
records past the checkpoint it resumes from, so the file reads as one run.
A record that cannot be written (a full disk) stops the writing and is reported
at the next checkpoint, which is then not written (:meth:`MetricsLogger.failure`):
the run resumes from the previous one and writes the lost records again.

Peak device memory (:func:`reset_peak_memory`, :func:`peak_memory_mb`): what ``lbsgd train`` logs per
epoch (``memory/peak_allocated_mb``, ``memory/peak_reserved_mb``) and ``lbsgd eval`` writes to eval.json,
on a CUDA device; a CPU has no separate device memory to measure, so it logs nothing there.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k``."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak device memory since the last :func:`reset_peak_memory`, in MiB: ``allocated``
    (tensors) and ``reserved`` (what the caching allocator holds, what ``nvidia-smi`` shows less the CUDA
    context). Empty off CUDA."""
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.max_memory_allocated(device) / 2**20,
            "reserved": torch.cuda.max_memory_reserved(device) / 2**20}


class MetricsLogger:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_iteration: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.failed: str | None = None  # why a record could not be written (then nothing more is)
        self._tb = None
        if not enabled:
            return
        if resume_iteration is not None and self.path.exists():
            self._truncate_after(resume_iteration)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_iteration)
            except ImportError:  # tensorboard is a dependency; tolerate a stripped install
                self._tb = None

    def _truncate_after(self, iteration: int) -> None:
        """Drop records written after the checkpoint being resumed (they will be written again)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("step", 0) <= iteration:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; ``step`` (the global iteration) indexes TensorBoard scalars."""
        if not self.enabled or self.failed:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as exc:  # no later record is written: the file must not skip one
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.failed = f"cannot write {self.path}: {'the disk is full' if full else exc.strerror or exc}"
            return
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if "/" in key or key in ("lr", "images_per_sec"):
                    if isinstance(value, int | float):
                        self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            self._file.close()
        except OSError:  # the buffered rest of a failed line
            pass
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (skipping a line cut short by a kill)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class Progress:
    """A rich progress bar on a terminal, plain periodic lines otherwise; silent off rank 0."""

    def __init__(self, mode: str, enabled: bool, total_iters: int, every: int) -> None:
        self.enabled, self.every = enabled, every
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self._bar = None
        self._last = time.monotonic()
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.4g}  {task.fields[ips]:.0f} img/s"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_iters, epoch=0, loss=float("nan"), lr=0.0, ips=0.0)

    def update(self, iteration: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        if self.mode == "rich":
            self._bar.update(self._task, completed=iteration, epoch=epoch, loss=loss, lr=lr, ips=ips)
        elif self.mode == "plain" and iteration % self.every == 0:
            print(f"iter {iteration}  epoch {epoch}  loss {loss:.4f}  lr {lr:.4g}  {ips:.0f} img/s", flush=True)

    def tick(self, iteration: int, epoch: int) -> None:
        """Move the bar every iteration (loss and lr are refreshed on logging iterations)."""
        if self.mode == "rich":
            self._bar.update(self._task, completed=iteration, epoch=epoch)

    def epoch_line(self, text: str) -> None:
        if self.mode == "rich":
            self._bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
