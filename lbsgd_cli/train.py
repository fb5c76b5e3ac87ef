"""``lbsgd train``: the paper's large-minibatch SGD loop, top to bottom.

One global minibatch of ``k*n`` per optimizer step (§2). This process holds ``k/W`` of the ``k``
workers; :func:`lbsgd_cli.engine.train_step` runs them through the network ``workers_per_pass`` at
a time, BN normalising each worker's ``n`` samples on their own (ghost BN, §2.3), accumulating
gradients without communication until the last pass, then takes one SGD step at the rate of
:func:`rules.lr_at`. The parallel strategy (:mod:`lbsgd_cli.parallel`) hides whether this is one
process, DDP or FSDP2; the run directory (:mod:`lbsgd_cli.rundir`) is locked, resumed and
checkpointed through :class:`~lbsgd_cli.rundir.RunDir`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from . import distributed as D
from .checkpoint import unwrap
from .choices import CompileMode, Decay, LRRule, Warmup
from .config import normalise_train
from .data import TrainLoader, load_data
from .device_defaults import (DeviceCaps, Resolved, bf16_cpu_slowdown, bf16_cpu_warning, cpu_native_bf16, resolve_auto,
                              set_backend_flags)
from .divergence import DivergenceWatch
from .engine import StepPlan, StepResult, evaluate, make_grad_scaler, pass_workers, train_step
from .errors import Diverged, Preempted, UserError
from .metrics import MetricsLogger, Progress, peak_memory_mb, reset_peak_memory
from .models import build_model, configured_dead_channels, zero_gamma_dead_warning
from .optim import build_optimizer, set_lr
from .parallel import Parallel, make_parallel
from .preemption import PreemptionFlag
from .rules import iters_per_epoch, loss_normaliser, lr_at, peak_lr
from .rundir import RunDir, RunState, print_summary, zero_sums
from .data import DataSource
from .stage_checkpointing import enable_stage_checkpointing
from .validation import validate


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` in ``run_dir``; returns the final summary."""
    validate(cfg)
    normalise_train(cfg)  # one spelling per value in config.yaml and the checkpoints
    t_start = time.monotonic()
    dist = D.init_distributed(cfg.device, cfg.dist.timeout_s, cfg.dist.backend, cfg.dist.rendezvous_timeout_s)
    k, n, W = cfg.batch.k, cfg.batch.n, dist.world_size
    if k % W:
        raise UserError(f"batch.k: {k} workers cannot be split evenly over {W} processes")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    auto = resolve_device_defaults(cfg, dist.device)  # cfg holds the resolved values from here on
    # deterministic: cuDNN's fixed algorithms (bit-exact resume and 1-vs-W); else benchmark picks the fastest
    set_backend_flags(cfg.deterministic, dist.device)
    parallel = make_parallel(dist, cfg.memory, cfg.dist)

    # ---- data (Remark 4: one shuffle per epoch, divided among the k workers)
    data = load_data(cfg.data)
    if k * n > data.train_size:
        raise UserError(f"batch: k*n = {k * n} is larger than the training set ({data.train_size} images)")
    data = data.to(parallel.device)  # small sets live on the device and are augmented there
    loader = TrainLoader(data, k, n, parallel.rank, W, seed=cfg.seed, device=parallel.device)
    ipe = iters_per_epoch(data.train_size, k, n)

    with RunDir(run_dir, parallel) as rundir:  # held by this run until it ends: a second start is refused
        # ---- model (§5.1 init, ghost BN over n), optimizer (§5.1 parameter groups), rate (§2.1, §2.2)
        model = parallel.wrap(_build_model(cfg, data, parallel.device))
        rate, peak = learning_rate(cfg, ipe)
        optimizer = build_optimizer(unwrap(model), cfg.optim, rate(0))
        per_pass = pass_workers(cfg.batch.workers_per_pass, k // W, n, parallel.device)
        if cfg.compile and cfg.compile_mode == CompileMode.reduce_overhead and (k // W) % per_pass:
            raise UserError(f"batch.workers_per_pass: compile_mode=reduce_overhead replays CUDA graphs of one "
                            f"shape; {per_pass} worker(s) per pass do not divide the {k // W} of this process")
        plan = StepPlan(per_process=k // W, per_pass=per_pass, n=n,
                        loss_scale=W / loss_normaliser(k, n),  # Remark 3: sum/(k*n); DDP's mean over W undone
                        precision=cfg.precision, channels_last=cfg.model.channels_last, parallel=parallel)

        # ---- resume from the run directory, or start it
        state = rundir.resume_or_start(cfg, model, optimizer, auto_chosen=auto.chosen)
        t_start -= state.elapsed_s  # wall time counts every start of the run, not only this one
        already_complete = state.iteration >= ipe * cfg.schedule.epochs
        loop = Loop(cfg=cfg, parallel=parallel, rundir=rundir, model=model, optimizer=optimizer, loader=loader,
                    plan=plan, rate=rate, ipe=ipe, t_start=t_start, resumed_at=state.iteration or None)
        if loop.scaler is not None and state.scaler:  # fp16: the loss scale and its growth tracker resume
            loop.scaler.load_state_dict(state.scaler)
        if parallel.is_main:
            _print_header(loop, data, peak, state, already_complete, auto)
        last_epoch = min(cfg.schedule.epochs, cfg.checkpoint.stop_after_epoch or cfg.schedule.epochs)
        try:
            while state.epoch < last_epoch:
                images, seconds = train_one_epoch(loop, state)
                last_val = evaluate(parallel.eval_model(model),  # fp32 in every precision, as lbsgd eval
                                    parallel.val_batches(data, cfg.batch.eval_batch), parallel.reduce_sums,
                                    channels_last=cfg.model.channels_last,
                                    static_batch=cfg.batch.eval_batch if cfg.compile else None)
                end_epoch(loop, state, last_val, images / max(seconds, 1e-9), data.num_classes)
        except Diverged as exc:  # nothing was written after the non-finite loss; the summary says so
            rundir.finish_diverged(state.last_val, time.monotonic() - loop.t_start, exc.iteration, exc.lr)
            raise
        except RuntimeError as exc:  # a rank died or hangs: a one-line PeerFailure, not a traceback
            failure = D.peer_failure(exc, dist, state.iteration)
            if failure is None:
                raise
            raise failure from None
        finally:
            loop.close()
        if state.epoch < cfg.schedule.epochs:  # a probe: the first epochs of the run, which resumes later
            if parallel.is_main:
                print(f"lbsgd train: stopped after epoch {state.epoch} of {cfg.schedule.epochs} "
                      f"(checkpoint.stop_after_epoch); the same command without it continues the run")
            D.barrier()
            return {"stopped_after_epoch": state.epoch, "run_dir": str(run_dir)}
        summary = rundir.finish(state.last_val, time.monotonic() - loop.t_start, already_complete)
    if parallel.is_main:
        print_summary(summary)
    D.barrier()
    return summary


def resolve_device_defaults(cfg: DictConfig, device: torch.device) -> Resolved:
    """Replace the ``auto`` values of precision, model.channels_last and deterministic in ``cfg`` (in place)
    by what :func:`lbsgd_cli.device_defaults.resolve_auto` chooses for ``device``; config.yaml and the
    checkpoints then record the arithmetic that ran."""
    auto = resolve_auto(cfg.precision, cfg.model.channels_last, cfg.deterministic, DeviceCaps.of(device))
    cfg.precision, cfg.model.channels_last, cfg.deterministic = auto.precision, auto.channels_last, auto.deterministic
    return auto


def _build_model(cfg: DictConfig, data: DataSource, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, bn_group=cfg.batch.n).to(device)
    if cfg.model.channels_last:  # NHWC weights; train_step and evaluate convert the inputs
        model = model.to(memory_format=torch.channels_last)
    if cfg.memory.checkpointing:  # same result, less activation memory (lbsgd_cli/stage_checkpointing.py)
        enable_stage_checkpointing(model)
    if cfg.compile:  # torch.compile in place (state dict keys unchanged), before DDP/FSDP2 wrap it, as torch advises
        mode = CompileMode(cfg.compile_mode)
        if mode == CompileMode.default:
            model.compile()
        else:  # CUDA graphs / autotuned kernels are recorded per shape: shapes are static (train_step, evaluate)
            model.compile(mode=mode.torch_mode, dynamic=False)
    return model


def learning_rate(cfg: DictConfig, ipe: int) -> tuple[Callable[[int], float], float]:
    """The rate of each iteration (§2.2 warmup, then §5.1's steps or ``schedule.decay``: :func:`rules.lr_at`)
    and its peak (§2.1)."""
    b, o, s = cfg.batch, cfg.optim, cfg.schedule
    peak = peak_lr(o.base_lr, b.k, b.n, o.ref_batch, LRRule(o.lr_rule))
    rate = functools.partial(lr_at, base_lr=o.base_lr, peak=peak, iters_per_epoch=ipe, warmup=Warmup(s.warmup),
                             warmup_epochs=s.warmup_epochs, milestones=list(s.milestones), gamma=s.gamma,
                             decay=Decay(s.decay), total_iters=s.epochs * ipe, power=s.poly_power)
    return rate, peak


# --------------------------------------------------------------------------- one epoch


@dataclass(kw_only=True)
class Loop:
    """The parts of a training run that every epoch uses, plus its logging (made from them)."""

    cfg: DictConfig
    parallel: Parallel
    rundir: RunDir
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: TrainLoader
    plan: StepPlan
    rate: Callable[[int], float]
    ipe: int  # iterations per epoch
    t_start: float  # time.monotonic() at the run's start, less the time of its earlier starts
    resumed_at: int | None  # the iteration this start resumes at; None for a fresh run

    def __post_init__(self) -> None:
        cfg, main, total = self.cfg, self.parallel.is_main, self.ipe * self.cfg.schedule.epochs
        self.logger = MetricsLogger(self.rundir.path, main, cfg.log.tensorboard, resume_iteration=self.resumed_at)
        self.progress = Progress(cfg.log.progress, main, total, cfg.log.every)
        self.stopper = PreemptionFlag(cfg.checkpoint.preempt_signals, cfg.checkpoint.preempt_check_every)
        self.noise = noise_probe(cfg, self.model, self.optimizer, self.plan, self.parallel.world_size)
        self.scaler = make_grad_scaler(self.plan.precision, self.parallel.device)  # fp16 only
        self.watch = DivergenceWatch(self.parallel.device)
        self.saved_at = self.resumed_at  # the iteration of the checkpoint on disk (None: none yet)
        self.sums: dict[str, torch.Tensor] = {}  # the running epoch's loss and hit sums, on the device
        self.compiled_note = False  # compile=true: the first step's time (compilation included) was printed

    def load_sums(self, state: RunState) -> None:
        """Move the running epoch's partial sums (floats in the state) onto the device."""
        device = self.parallel.device
        self.sums = {key: torch.tensor(float(state.epoch_sums.get(key, 0.0)), dtype=torch.float64, device=device)
                     for key in ("loss", "correct", "skipped")}

    def store_sums(self, state: RunState) -> None:
        """Read the device sums back into the state (a host sync: at checkpoints and epoch ends only)."""
        for key, value in self.sums.items():
            state.epoch_sums[key] = float(value)

    def close(self) -> None:
        self.progress.close()
        self.logger.close()
        self.stopper.restore()


def train_one_epoch(loop: Loop, state: RunState) -> tuple[int, float]:
    """The steps of ``state.epoch`` from ``state.iter_in_epoch`` on; returns images seen and seconds taken.

    Nothing in a step waits for the device: loss and hit sums stay device tensors, read every
    ``log.every`` steps, before a checkpoint and at the epoch's end; so does the divergence flag."""
    cfg, p = loop.cfg, loop.parallel
    loop.model.train()
    loop.load_sums(state)
    t_epoch, images = time.monotonic(), 0
    batches = D.inject_faults(loop.loader.epoch(state.epoch, state.iter_in_epoch), p.rank, state.iteration)
    for x, y in batches:
        lr = loop.rate(state.iteration)
        set_lr(loop.optimizer, lr)
        t_step = time.monotonic()
        step = train_step(loop.model, loop.optimizer, (x, y), loop.plan, loop.scaler)
        if (loop.cfg.compile or loop.cfg.model.bn_kernel == "fused") and not loop.compiled_note:
            _note_compile(loop, time.monotonic() - t_step)
        loop.watch.update(step.loss, state.iteration)
        _accumulate(loop, step)
        state.iteration += 1
        state.iter_in_epoch += 1
        images += cfg.batch.k * cfg.batch.n
        state.epoch_sums["count"] += x.shape[0]
        loop.progress.tick(state.iteration, state.epoch)
        if loop.watch.every_step:
            loop.watch.check(loop.rate, loop.saved_at)
        if state.iteration % cfg.log.every == 0:
            _log_step(loop, state, step, lr, images / max(time.monotonic() - t_epoch, 1e-9))
        every = cfg.checkpoint.every_iters
        due = bool(every) and state.iteration % every == 0
        if loop.stopper.agreed(p.device, state.iteration, force=due) or due:
            _save(loop, state)
            if loop.stopper.raised:
                _leave_preempted(loop, state.iteration)
    loop.watch.check(loop.rate, loop.saved_at)
    loop.store_sums(state)
    return images, time.monotonic() - t_epoch


def _note_compile(loop: Loop, seconds: float) -> None:
    """Once per start: torch.compile (compile=true, model.bn_kernel=fused) compiles lazily, in the first
    step; say how long that step took."""
    loop.compiled_note = True
    if loop.parallel.is_main:
        print(f"compile: the first step took {seconds:.1f} s, torch.compile's compilation included", flush=True)


def _accumulate(loop: Loop, step: StepResult) -> None:
    loop.sums["loss"] += step.loss
    loop.sums["correct"] += step.hits
    if step.skipped is not None:
        loop.sums["skipped"] += step.skipped


def _log_step(loop: Loop, state: RunState, step: StepResult, lr: float, images_per_sec: float) -> None:
    """The per-iteration record: the last step's mean loss over all ranks (the only read of it)."""
    loop.watch.check(loop.rate, loop.saved_at)  # a diverged run logs no non-finite loss
    k, n, p = loop.cfg.batch.k, loop.cfg.batch.n, loop.parallel
    loss = p.reduce_sums({"loss": step.loss_sum})["loss"] / (k * n)
    noise = loop.noise.result(functools.partial(_mean_over_ranks, p)) if loop.noise else {}
    loop.logger.log({"step": state.iteration, "iter": state.iteration, "epoch": state.iteration / loop.ipe,
                     "lr": lr, "train/loss": loss, **noise})
    loop.progress.update(state.iteration, state.epoch, loss, lr, images_per_sec)


def end_epoch(loop: Loop, state: RunState, last_val: dict[str, float], images_per_sec: float,
              num_classes: int) -> None:
    """Log the epoch's train and val figures and checkpoint the start of the next epoch."""
    sums = loop.parallel.reduce_sums(state.epoch_sums)
    state.last_val, state.epoch, state.iter_in_epoch = last_val, state.epoch + 1, 0
    record = {
        "step": state.iteration,
        "epoch": state.epoch,
        "train/err": 1.0 - sums["correct"] / sums["count"],
        "train/loss": sums["loss"] / sums["count"],
        "val/err": last_val["top1_err"],
        "val/loss": last_val["loss"],
        "images_per_sec": images_per_sec,
        "time": time.monotonic() - loop.t_start,
    }
    if num_classes > 5:
        record["val/top5_err"] = last_val["top5_err"]
    skipped = ""
    bad = loop.loader.data.bad
    if bad.skip:  # data.skip_bad: distinct bad files so far over all ranks (a collective), never silent
        record["data/bad_files"] = bad.count(loop.parallel.device)
        skipped = f"  bad files {record['data/bad_files']}"
    if loop.scaler is not None:  # fp16: steps the scaler skipped (inf/nan gradients); the same on every rank
        record["train/skipped_steps"] = round(sums.get("skipped", 0.0) / loop.parallel.world_size)
        skipped += f"  skipped steps {record['train/skipped_steps']}"
    peak = peak_memory_mb(loop.parallel.device)  # CUDA: this rank's peak over the epoch (and the setup before it)
    if peak:
        record["memory/peak_allocated_mb"], record["memory/peak_reserved_mb"] = peak["allocated"], peak["reserved"]
        skipped += f"  peak memory {peak['allocated']:.0f} MiB"
        reset_peak_memory(loop.parallel.device)
    loop.logger.log(record)
    loop.progress.epoch_line(
        f"epoch {state.epoch}/{loop.cfg.schedule.epochs}  train err {record['train/err']:.4f}  "
        f"val err {record['val/err']:.4f}  {record['images_per_sec']:.0f} img/s{skipped}"
    )
    state.epoch_sums = zero_sums()
    loop.load_sums(state)  # the device sums start the next epoch at zero too
    _save(loop, state)


def _save(loop: Loop, state: RunState) -> None:
    """A checkpoint of ``state``; never after a non-finite loss (the one on disk is kept)."""
    loop.watch.check(loop.rate, loop.saved_at)
    loop.watch.check_state(unwrap(loop.model), state.iteration - 1, loop.rate, loop.saved_at)
    if loop.sums:
        loop.store_sums(state)
    state.elapsed_s = time.monotonic() - loop.t_start
    state.scaler = loop.scaler.state_dict() if loop.scaler is not None else {}
    loop.rundir.save(loop.cfg, loop.model, loop.optimizer, state, metrics_failed=loop.logger.failed)
    loop.saved_at = state.iteration


def _leave_preempted(loop: Loop, iteration: int) -> None:
    requeue = loop.cfg.dist.requeue and loop.stopper.raised != "SIGINT"  # not Ctrl-C
    if requeue and D.requeue_command() is not None:
        loop.stopper.hold()  # `scontrol requeue` ends the job at once: SIGTERM to every task, this one too
    note = D.requeue_slurm_job() if requeue and loop.parallel.is_main else ""
    D.barrier()  # nobody exits before the requeue (srun --kill-on-bad-exit)
    by = "stopped by SIGINT (Ctrl-C)" if loop.stopper.raised == "SIGINT" else f"preempted by {loop.stopper.raised}"
    raise Preempted(f"{by} at iteration {iteration}; checkpoint written; the same command resumes"
                    + (f"; {note}" if note else ""))


# --------------------------------------------------------------------------- noise scale and console


def noise_probe(cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: StepPlan, W: int):
    """The gradient noise scale probe of ``log.noise_scale`` (lbsgd_cli/noise_scale.py), or None.

    ``B_small``: the first pass's ``per_pass*n`` samples of this process; ``B_big = k*n``."""
    if not cfg.log.noise_scale:
        return None
    k, n = cfg.batch.k, plan.n
    if plan.per_pass >= plan.per_process:
        raise UserError(f"log.noise_scale: needs >= 2 forward passes per step; batch.workers_per_pass="
                        f"{plan.per_pass} is not below the {plan.per_process} workers per process (k/W = {k}/{W})")
    from .noise_scale import NoiseScaleProbe

    return NoiseScaleProbe(unwrap(model), optimizer, plan.per_pass * n, k * n, grad_scale=k / (W * plan.per_pass))


def _mean_over_ranks(parallel: Parallel, values: list[float]) -> list[float]:
    summed = parallel.reduce_sums({str(i): v for i, v in enumerate(values)})
    return [summed[str(i)] / parallel.world_size for i in range(len(values))]


# scripts/bench/bench_fp16_cpu.py on this project's 2-core CPU: one epoch of the digits preset on one thread, 3 rounds
# alternated in one process, medians fp32 864, bf16 687, fp16 92 img/s (README, "Bad inputs and what happens")
FP16_CPU_WARNING = ("warning: precision=fp16 on a CPU is about 9x slower than fp32 (92 against 864 img/s measured "
                    "on the digits preset; CPUs have few fp16 kernels); use precision=bf16 (687 img/s) or fp32")


def _print_header(loop: Loop, data: DataSource, peak: float, state: RunState, complete: bool,
                  auto: Resolved | None = None) -> None:
    cfg, W = loop.cfg, loop.parallel.world_size
    k, n = cfg.batch.k, cfg.batch.n
    resumed = f", resuming at iteration {state.iteration}" if state.iteration else ""
    if complete:
        resumed = "; this run is already complete (nothing to do)"
    # torch's default (threads=0) is every core: two runs on one machine then wait on each other's OpenMP threads
    threads = (f" of {torch.get_num_threads()} CPU thread(s) (threads={cfg.threads})"
               if loop.parallel.device.type == "cpu" else "")
    print(
        f"lbsgd train: {cfg.model.arch} on {cfg.data.name} ({data.train_size} train / {data.val_size} val), "
        f"kn = {k}x{n} = {k * n} on {W} process(es){threads}, peak lr {peak:.4g}, {loop.ipe} iters/epoch x "
        f"{cfg.schedule.epochs} epochs{resumed}\n{loop.plan.passes} forward pass(es) of {loop.plan.per_pass} "
        f"worker(s) per step and process (batch.workers_per_pass={cfg.batch.workers_per_pass}), "
        f"ghost BN over n = {n} (model.bn_kernel={cfg.model.bn_kernel})\n"
        + (f"{auto.note}\n" if auto is not None and auto.note else "")
        + f"run dir: {loop.rundir.path}",
        flush=True,
    )
    if data.bad.header():
        print(data.bad.header(), flush=True)
    if cfg.precision == "fp16" and loop.parallel.device.type == "cpu":
        print(FP16_CPU_WARNING, flush=True)
    if cfg.precision == "bf16" and loop.parallel.device.type == "cpu" and cpu_native_bf16() is False:
        print(bf16_cpu_warning(*bf16_cpu_slowdown()), flush=True)
    dead = zero_gamma_dead_warning(configured_dead_channels(cfg.model))  # zero-gamma with option A (Table 2b)
    if dead:
        print(dead, flush=True)
    if W > 1:
        payload = D.allreduce_bytes(unwrap(loop.model), cfg.dist.comm_hook, cfg.dist.powersgd_rank)
        print(f"allreduce payload per step and process: {payload / 2**20:.3f} MiB "
              f"(dist.comm_hook={cfg.dist.comm_hook})", flush=True)
