"""One SGD step and one evaluation: the public core that train, eval, quantize and the benchmarks share.

:func:`train_step` is §2's step on this process's workers: ``per_pass`` workers of ``n`` samples go
through the network at a time (ghost BN normalises each worker's ``n`` on its own, §2.3), gradients
accumulate without communication until the last pass, the loss is a sum scaled by ``loss_scale``
(Remark 3: ``W/(k*n)``, since DDP and FSDP2 average over the ``W`` processes), then one optimizer step
and one reduction of the BN running statistics. :func:`evaluate` sums top-1/top-5 hits and the loss
over the batches it is given and reduces the sums with the function it is given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import unwrap
from .choices import Precision
from .ghost_bn import deferred_running_stats, flush_running_stats
from .metrics import topk_correct
from .parallel import Parallel


# batch.workers_per_pass=auto on a CPU: passes of at most this many samples. Small passes keep a layer's
# activations in cache; on this project's CPU (ResNet-8/20, n = 32) two workers per pass train 1.2-1.9x
# faster than all 32 of kn = 1024 in one pass (scripts/bench/bench_passes.py, results/performance.md).
CPU_PASS_SAMPLES = 64


def pass_workers(setting: int | str, per_process: int, n: int, device: torch.device) -> int:
    """Workers per forward pass for ``batch.workers_per_pass = setting`` (``auto``, 0 = all, or a number).

    ``auto`` on a CPU: the largest divisor of ``per_process`` whose pass holds at most
    :data:`CPU_PASS_SAMPLES` samples (at least one worker); on an accelerator all of the process's workers
    in one pass (the fastest there; set a number when that does not fit in memory). The choice changes only
    the order in which gradients are summed (README, "Guarantee")."""
    if setting == "auto":
        if device.type != "cpu":
            return per_process
        fit = max(1, CPU_PASS_SAMPLES // n)
        return max(d for d in range(1, min(fit, per_process) + 1) if per_process % d == 0)
    return min(int(setting), per_process) or per_process


@dataclass(frozen=True)
class StepPlan:
    """How one step runs on this process: what :func:`train_step` needs besides the model and the batch."""

    per_process: int  # workers held by this process (k/W)
    per_pass: int  # workers per forward pass (:func:`pass_workers` of batch.workers_per_pass)
    n: int  # samples per worker, the BN batch
    loss_scale: float  # multiplies the summed loss: W/(k*n) (Remark 3)
    precision: Precision = Precision.fp32  # bf16/fp16: autocast of forward and loss (fp16: with a GradScaler)
    channels_last: bool = False  # model.channels_last: each pass's input in NHWC, like the model's weights
    parallel: Parallel | None = field(default=None, compare=False)  # None: one process

    @property
    def passes(self) -> int:
        return math.ceil(self.per_process / (self.per_pass or self.per_process))


@dataclass
class StepResult:
    """One step's figures as device tensors: nothing in :func:`train_step` waits for the device.

    ``loss_sum``/``correct`` read them (a host sync): callers do so only every ``log.every`` steps."""

    loss: torch.Tensor  # 0-dim float64: summed (unscaled) cross-entropy over this process's samples
    hits: torch.Tensor  # 0-dim int64: top-1 hits among them
    skipped: torch.Tensor | None = None  # fp16: 0-dim bool, the scaler skipped this step (inf/nan gradients)

    @property
    def loss_sum(self) -> float:
        return float(self.loss)

    @property
    def correct(self) -> int:
        return int(self.hits)


def autocast(precision: Precision | str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision of ``precision``: bf16 or fp16 autocast of forward passes and losses; fp32 does nothing.

    Backward runs outside the context as autocast prescribes; parameters, gradients, the optimizer
    and BN running statistics stay fp32 (ghost BN computes its statistics in fp32 from low-precision
    inputs, lbsgd_cli/ghost_bn.py)."""
    if precision == Precision.auto:
        raise ValueError("precision=auto is resolved before training (lbsgd_cli.device_defaults.resolve_auto)")
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == Precision.fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def make_grad_scaler(precision: Precision | str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (``torch.amp.GradScaler`` of the device's type); None in fp32 and bf16, whose
    exponent range is fp32's."""
    if precision != Precision.fp16:
        return None
    return torch.amp.GradScaler(device.type)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
               plan: StepPlan, scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One SGD step on this process's share ``batch = (x, y)`` of the global minibatch (§2, §2.3, §3).

    With ``scaler`` (fp16) each pass's loss is scaled before backward and the global step ends in one
    ``scaler.step``/``scaler.update``: a step whose gradients hold inf/nan is skipped (the caller still
    advances the iteration, so the rate schedule is unchanged) and reported in ``StepResult.skipped``."""
    x, y = batch
    parallel = plan.parallel or _SINGLE
    passes, chunk = plan.passes, (plan.per_pass or plan.per_process) * plan.n
    loss_total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    optimizer.zero_grad(set_to_none=True)
    with deferred_running_stats(unwrap(model)) as bn_layers:
        for p in range(passes):
            xs, ys = x[p * chunk : (p + 1) * chunk], y[p * chunk : (p + 1) * chunk]
            if plan.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            with parallel.grad_sync(model, last_pass=p == passes - 1):
                with autocast(plan.precision, xs.device):
                    out = model(xs)
                    loss = F.cross_entropy(out, ys, reduction="sum")
                scaled = loss * plan.loss_scale
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_total += loss.detach()  # on the device: no host sync per pass
            correct += (out.detach().argmax(1) == ys).sum()
    skipped = _optimizer_step(optimizer, scaler)
    flush_running_stats(bn_layers, reduce=parallel.reduce_buffers)
    return StepResult(loss_total, correct, skipped)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """The step, through the scaler in fp16; then whether the scaler skipped it (its scale backs off
    exactly when it found inf/nan gradients), as a device tensor."""
    if scaler is None:
        optimizer.step()
        return None
    before = scaler._scale.clone() if scaler._scale is not None else None  # set by the first scaler.scale
    scaler.step(optimizer)
    scaler.update()
    return scaler._scale < before if before is not None else None


def _no_reduce(sums: dict[str, float]) -> dict[str, float]:
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
             reduce: Callable[[dict[str, float]], dict[str, float]] = _no_reduce, *,
             channels_last: bool = False, static_batch: int | None = None) -> dict[str, float]:
    """Top-1/top-5 error, mean loss and image count over ``batches``, in eval mode, in fp32.

    ``reduce`` sums the partial sums over processes (:meth:`Parallel.reduce_sums`); a batch whose
    labels are None is run for its collectives only (FSDP2's padding of uneven val shares).
    ``static_batch``: a smaller batch is padded with zeros to this size and its padding's outputs dropped,
    so a compiled model sees one shape (CUDA graphs of ``compile_mode=reduce_overhead`` replay one shape;
    in eval mode BN uses running statistics, so a sample's output does not depend on its batch)."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for x, y in batches:
        b = x.shape[0]
        if static_batch is not None and b < static_batch:
            x = torch.cat([x, x.new_zeros(static_batch - b, *x.shape[1:])])
        out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)[:b]
        if y is None:
            continue
        sums["loss"] += float(F.cross_entropy(out, y, reduction="sum"))
        c1, c5 = topk_correct(out, y)
        sums["top1"] += c1
        sums["top5"] += c5
        sums["count"] += y.shape[0]
    sums = reduce(sums)
    model.train(was_training)
    c = max(sums["count"], 1.0)
    return {
        "top1_err": 1.0 - sums["top1"] / c,
        "top5_err": 1.0 - sums["top5"] / c,
        "loss": sums["loss"] / c,
        "images": int(sums["count"]),
    }


_SINGLE = Parallel()  # one process: plain passes, no reductions
