"""``lbsgd train``: the paper's large-minibatch SGD loop, top to bottom.

One global minibatch of ``k*n`` per optimizer step (§2). This process holds
``k/W`` of the ``k`` workers; it runs them through the network ``workers_per_pass``
at a time, BN normalising each worker's ``n`` samples on their own (ghost BN,
§2.3), accumulating gradients without communication until the last pass (DDP's
``no_sync``), then takes one SGD step at the rate of :func:`rules.lr_at`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .checkpoint import FORMAT, atomic_save, load_checkpoint, load_model_state, rng_state, set_rng_state, unwrap
from .config import LRRule, TrainConfig, Warmup, validate
from .data import TrainLoader, largest_val_share_batches, load_data, val_batches
from .errors import Preempted, UserError
from .ghost_bn import deferred_running_stats, flush_running_stats
from .metrics import MetricsLogger, Progress, read_metrics, topk_correct
from .memory import enable_stage_checkpointing, full_state_dicts, is_sharded, load_full_state_dicts, shard_model
from .models import build_model
from .optim import build_optimizer, set_lr
from .rules import iters_per_epoch, loss_normaliser, lr_at, peak_lr

# Keys that may change between a run and its resumption without changing its result
# (dist.comm_hook and dist.powersgd_* do change it: they are compared).
RESUME_IGNORED = ("log", "checkpoint", "data.num_workers", "data.root", "data.cache_dir", "device", "threads",
                  "dist.backend", "dist.timeout_s", "dist.requeue", "batch.workers_per_pass", "memory", "offload")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` in ``run_dir``; returns the final summary."""
    validate(cfg)
    t_start = time.monotonic()
    dist = D.init_distributed(cfg.device, cfg.dist.timeout_s, cfg.dist.backend)
    run_dir = Path(D.broadcast_object(str(run_dir)))  # every rank writes to rank 0's folder
    k, n, W = cfg.batch.k, cfg.batch.n, dist.world_size
    if k % W:
        raise UserError(f"batch.k: {k} workers cannot be split evenly over {W} processes")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    device = dist.device

    # ---- data (Remark 4: one shuffle per epoch, divided among the k workers)
    data = load_data(cfg.data)
    if k * n > data.train_size:
        raise UserError(f"batch: k*n = {k * n} is larger than the training set ({data.train_size} images)")
    if hasattr(data, "to"):
        data = data.to(device)  # small sets live on the device and are augmented there
    loader = TrainLoader(data, k, n, dist.rank, W, cfg.seed, device)
    ipe = iters_per_epoch(data.train_size, k, n)
    total_iters = ipe * cfg.schedule.epochs

    # ---- model (§5.1 init, ghost BN over n) and optimizer (§5.1 parameter groups)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, bn_group=n).to(device)
    if cfg.model.channels_last:  # NHWC weights; _step and evaluate convert the inputs
        model = model.to(memory_format=torch.channels_last)
    if cfg.memory.checkpointing:  # same result, less activation memory (lbsgd_cli/memory.py)
        enable_stage_checkpointing(model)
    if cfg.memory.fsdp:  # FSDP2: 1/W of parameters, gradients and optimizer state per process (memory.py)
        model = shard_model(model, dist, cfg.memory.fsdp_cpu_offload)
    elif dist.enabled:
        # broadcast_buffers=False keeps ghost-BN buffers rank-local (ghost_bn reduces them once per step);
        # torch 2.14 deprecates the flag with a FutureWarning and has no replacement for it yet
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
            )
    base_lr = cfg.optim.base_lr
    peak = peak_lr(base_lr, k, n, cfg.optim.ref_batch, LRRule(cfg.optim.lr_rule))

    def rate(iteration: int) -> float:  # §2.2 warmup then §5.1 steps: see rules.lr_at
        return lr_at(
            iteration,
            base_lr=base_lr,
            peak=peak,
            iters_per_epoch=ipe,
            warmup=Warmup(cfg.schedule.warmup),
            warmup_epochs=cfg.schedule.warmup_epochs,
            milestones=list(cfg.schedule.milestones),
            gamma=cfg.schedule.gamma,
        )

    optimizer = build_optimizer(unwrap(model), cfg.optim, rate(0))
    # compressed gradient allreduce (beyond the paper); a no-op without DDP (one process, FSDP2)
    D.register_comm_hook(model, cfg.dist.comm_hook, cfg.dist.powersgd_rank, cfg.dist.powersgd_start_iter)

    # ---- resume from the run directory, or start it
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    state = _resume_or_start(cfg, run_dir, ckpt_path, model, optimizer, dist, device)
    iteration, epoch, start_in_epoch = state["iteration"], state["epoch"], state["iter_in_epoch"]
    t_start -= float(state.get("elapsed_s", 0.0))  # wall time counts every start of the run, not only this one
    already_complete = iteration >= total_iters
    # the checkpoint holds the epoch's partial sums over all ranks; rank 0 carries them on
    epoch_sums = (state.get("epoch_sums") if dist.is_main else None) or _zero_sums()

    logger = MetricsLogger(run_dir, dist.is_main, cfg.log.tensorboard, resume_iteration=iteration if iteration else None)
    progress = Progress(cfg.log.progress, dist.is_main, total_iters, cfg.log.every)
    stopper = _PreemptionFlag(cfg.checkpoint.preempt_signals)
    per_process = k // W
    per_pass = cfg.batch.workers_per_pass or per_process
    loss_scale = W / loss_normaliser(k, n)  # Remark 3: sum / (k*n); DDP's mean over W is undone by W
    noise = _noise_probe(cfg, model, optimizer, k, n, W, per_process, per_pass)  # None unless log.noise_scale
    last_val: dict[str, float] = state.get("last_val") or {}
    if dist.is_main:
        _print_header(cfg, run_dir, data, k, n, W, peak, ipe, iteration, already_complete)
        if W > 1:
            payload = D.allreduce_bytes(unwrap(model), cfg.dist.comm_hook, cfg.dist.powersgd_rank)
            print(f"allreduce payload per step and process: {payload / 2**20:.3f} MiB "
                  f"(dist.comm_hook={cfg.dist.comm_hook})", flush=True)

    try:
        while epoch < cfg.schedule.epochs:
            model.train()
            t_epoch = time.monotonic()
            images_this_epoch = 0
            for x, y in loader.epoch(epoch, start_in_epoch):
                D.maybe_inject_fault(dist.rank, iteration)  # tests only: LBSGD_FAULT_*
                lr = rate(iteration)
                set_lr(optimizer, lr)
                loss_sum, correct = _step(model, optimizer, x, y, per_process, per_pass, n, loss_scale, W, dist,
                                          precision=cfg.precision, channels_last=cfg.model.channels_last)
                iteration += 1
                start_in_epoch += 1
                images_this_epoch += k * n
                epoch_sums["loss"] += loss_sum
                epoch_sums["correct"] += correct
                epoch_sums["count"] += x.shape[0]
                progress.tick(iteration, epoch)
                if iteration % cfg.log.every == 0:
                    g = D.reduce_scalars({"loss": loss_sum}, device)
                    ips = images_this_epoch / max(time.monotonic() - t_epoch, 1e-9)
                    logger.log(
                        {"step": iteration, "iter": iteration, "epoch": iteration / ipe, "lr": lr,
                         "train/loss": g["loss"] / (k * n),
                         **(noise.result(lambda v: _mean_over_ranks(v, device, W)) if noise else {})}
                    )
                    progress.update(iteration, epoch, g["loss"] / (k * n), lr, ips)
                if stopper.agreed(device) or (
                    cfg.checkpoint.every_iters and iteration % cfg.checkpoint.every_iters == 0
                ):
                    _save(ckpt_path, cfg, model, optimizer, iteration, epoch, start_in_epoch, epoch_sums, last_val, dist,
                          time.monotonic() - t_start)
                    if stopper.raised:
                        note = D.requeue_slurm_job() if cfg.dist.requeue and dist.is_main else ""
                        D.barrier()  # nobody exits before the requeue (srun --kill-on-bad-exit)
                        raise Preempted(f"preempted by {stopper.raised} at iteration {iteration}; checkpoint written"
                                        + (f"; {note}" if note else ""))
            train_time = time.monotonic() - t_epoch
            sums = D.reduce_scalars(epoch_sums, device)
            # fp32 in every precision, as lbsgd eval
            last_val = evaluate(model, data, dist, cfg.batch.eval_batch, cfg.model.channels_last)
            epoch += 1
            start_in_epoch = 0
            record = {
                "step": iteration,
                "epoch": epoch,
                "train/err": 1.0 - sums["correct"] / sums["count"],
                "train/loss": sums["loss"] / sums["count"],
                "val/err": last_val["top1_err"],
                "val/loss": last_val["loss"],
                "images_per_sec": images_this_epoch / max(train_time, 1e-9),
                "time": time.monotonic() - t_start,
            }
            if data.num_classes > 5:
                record["val/top5_err"] = last_val["top5_err"]
            logger.log(record)
            progress.epoch_line(
                f"epoch {epoch}/{cfg.schedule.epochs}  train err {record['train/err']:.4f}  "
                f"val err {record['val/err']:.4f}  {record['images_per_sec']:.0f} img/s"
            )
            epoch_sums = _zero_sums()
            _save(ckpt_path, cfg, model, optimizer, iteration, epoch, 0, epoch_sums, last_val, dist,
                  time.monotonic() - t_start)
    except RuntimeError as exc:  # a rank died or hangs: a one-line PeerFailure, not a traceback
        failure = D.peer_failure(exc, dist, iteration)
        if failure is None:
            raise
        raise failure from None
    finally:
        progress.close()
        logger.close()
        stopper.restore()

    summary_path = run_dir / "summary.json"
    if already_complete and summary_path.exists():  # nothing ran: the summary written at the end stands
        summary = json.loads(summary_path.read_text())
    else:
        summary = _summary(run_dir, last_val, time.monotonic() - t_start)
        if dist.is_main:
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if dist.is_main:
        _print_summary(summary)
    D.barrier()
    return summary


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision of ``precision``: bf16 autocast of forward passes and losses; fp32 does nothing.

    Backward runs outside the context as autocast prescribes; parameters, gradients, the optimizer
    and BN running statistics stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _step(model, optimizer, x, y, per_process, per_pass, n, loss_scale, W, dist, precision="fp32",
          channels_last=False) -> tuple[float, int]:
    """One SGD step on this process's workers: passes of ``per_pass`` workers, one allreduce."""
    passes = math.ceil(per_process / per_pass)
    chunk = per_pass * n
    inner = unwrap(model)
    loss_total, correct = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    with deferred_running_stats(inner) as bn_layers:
        for p in range(passes):
            xs, ys = x[p * chunk : (p + 1) * chunk], y[p * chunk : (p + 1) * chunk]
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            sync = p == passes - 1
            ctx = contextlib.nullcontext()
            if is_sharded(model):  # FSDP2's no_sync: keep unsharded gradients until the last pass
                model.set_requires_gradient_sync(sync)
            elif dist.enabled and not sync:
                ctx = model.no_sync()
            with ctx:
                with autocast(precision, xs.device):
                    out = model(xs)
                    loss = F.cross_entropy(out, ys, reduction="sum")
                (loss * loss_scale).backward()
            loss_total += float(loss.detach())
            correct += int((out.detach().argmax(1) == ys).sum())
    optimizer.step()
    flush_running_stats(bn_layers, reduce=D.all_reduce_sum if dist.enabled else None)
    return loss_total, correct


@torch.no_grad()
def evaluate(model, data, dist, batch_size: int, channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5 error and mean loss on the val set, split over processes and summed."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    seen, x = 0, None
    for x, y in val_batches(data, dist.rank, dist.world_size, batch_size, dist.device):
        seen += 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = unwrap(model)(x)
        sums["loss"] += float(F.cross_entropy(out, y, reduction="sum"))
        c1, c5 = topk_correct(out, y)
        sums["top1"] += c1
        sums["top5"] += c5
        sums["count"] += y.shape[0]
    if is_sharded(model):  # FSDP2 all-gathers in every forward: run as many as rank 0 (the largest share)
        for _ in range(largest_val_share_batches(data, dist.world_size, batch_size) - seen):
            model(x[:1] if x is not None else next(val_batches(data, 0, 1, 1, dist.device))[0])
    sums = D.reduce_scalars(sums, dist.device)
    model.train(was_training)
    c = max(sums["count"], 1.0)
    return {
        "top1_err": 1.0 - sums["top1"] / c,
        "top5_err": 1.0 - sums["top5"] / c,
        "loss": sums["loss"] / c,
        "images": int(sums["count"]),
    }


# --------------------------------------------------------------------------- run directory


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0}


def _save(path, cfg, model, optimizer, iteration, epoch, iter_in_epoch, epoch_sums, last_val, dist,
          elapsed_s: float = 0.0) -> None:
    epoch_sums = D.reduce_scalars(epoch_sums, dist.device)
    # plain full state dicts whether or not the model is sharded (gathered by every rank under FSDP2)
    model_sd, optim_sd = full_state_dicts(unwrap(model), optimizer) if is_sharded(model) or dist.is_main else ({}, {})
    if not dist.is_main:
        D.barrier()
        return
    atomic_save(
        {
            "format": FORMAT,
            "model": model_sd,
            "optimizer": optim_sd,
            "iteration": iteration,
            "epoch": epoch,
            "iter_in_epoch": iter_in_epoch,
            "epoch_sums": dict(epoch_sums),  # partial sums of the running epoch, over all ranks
            "last_val": last_val,
            "elapsed_s": elapsed_s,  # wall time of the run so far, over all its starts
            "rng": rng_state(),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "meta": {"world_size": dist.world_size, "torch": torch.__version__},
        },
        path,
    )
    D.barrier()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_difference(old: dict, new: dict, ignored=RESUME_IGNORED) -> str | None:
    """The first key whose value differs between two resolved configs (ignoring ``ignored``)."""
    fo, fn = _flatten(old), _flatten(new)
    for key in sorted(set(fo) | set(fn)):
        if any(key == i or key.startswith(i + ".") for i in ignored):
            continue
        old_value = fo[key] if key in fo else _schema_defaults().get(key)  # a key added since that run
        if old_value != fn.get(key):
            return f"{key}: {fo.get(key)!r} -> {fn.get(key)!r}"
    return None


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """Every key's default in the schema: the value a key added after a run was started had in that run
    (new keys keep the old behaviour by default)."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True))


def _resume_or_start(cfg, run_dir: Path, ckpt_path: Path, model, optimizer, dist, device) -> dict[str, Any]:
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if D.broadcast_object(ckpt_path.exists()) != ckpt_path.exists():  # rank 0 decides whether to resume
        raise UserError(f"rank {dist.rank} does not see {ckpt_path} as rank 0 does; "
                        "the run directory must be on a file system shared by all nodes")
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        diff = config_difference(ckpt["config"], current)
        if diff:
            raise UserError(
                f"run directory {run_dir} holds a run with another config ({diff}); "
                "choose another hydra.run.dir or restore the config"
            )
        if is_sharded(model):  # the full state dicts of any run, sharded or not, are cut into this rank's shards
            load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"], str(ckpt_path))
        else:
            load_model_state(model, ckpt["model"], str(ckpt_path))
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["meta"].get("world_size") == dist.world_size:
            set_rng_state({k: v.cpu() if torch.is_tensor(v) else v for k, v in ckpt["rng"].items()})
        if dist.is_main:
            _append_run_info(run_dir, dist, cfg.seed, resumed_from=ckpt["iteration"])
        return ckpt
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        leftovers = [p.name for p in run_dir.iterdir() if p.name in ("metrics.jsonl", "summary.json")]
        if leftovers:
            raise UserError(
                f"run directory {run_dir} has {leftovers[0]} but no checkpoint to resume; "
                "choose another hydra.run.dir"
            )
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        _append_run_info(run_dir, dist, cfg.seed, resumed_from=None)
    D.barrier()
    return {"iteration": 0, "epoch": 0, "iter_in_epoch": 0}


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown (not a git checkout)"


def _append_run_info(run_dir: Path, dist, seed: int, resumed_from: int | None) -> None:
    path = run_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {"starts": []}
    info["starts"].append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from_iteration": resumed_from,
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "world_size": dist.world_size,
            "launcher": dist.launcher,
            "device": str(dist.device),
            "seed": seed,
        }
    )
    path.write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- preemption


class _PreemptionFlag:
    """Turns the configured signals into a checkpoint at the next iteration boundary."""

    def __init__(self, names: list[str]) -> None:
        self.raised: str | None = None
        self._old: dict[int, Any] = {}
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                raise UserError(f"checkpoint.preempt_signals: unknown signal {name!r}")
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handler(self, signum, frame) -> None:
        self.raised = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """True on every rank when any rank got a signal (one tiny allreduce with several processes)."""
        if D.dist.is_available() and D.dist.is_initialized():
            t = torch.tensor([1.0 if self.raised else 0.0], device=device)
            D.dist.all_reduce(t, op=D.dist.ReduceOp.MAX)
            if t.item() and not self.raised:
                self.raised = "a signal on another rank"
            return bool(t.item())
        return self.raised is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- console


def _noise_probe(cfg, model, optimizer, k: int, n: int, W: int, per_process: int, per_pass: int):
    """The gradient noise scale probe of ``log.noise_scale`` (lbsgd_cli/noise_scale.py), or None.

    ``B_small``: the first pass's ``per_pass*n`` samples of this process; ``B_big = k*n``."""
    if not cfg.log.noise_scale:
        return None
    if per_pass >= per_process:
        raise UserError(f"log.noise_scale: needs >= 2 forward passes per step; batch.workers_per_pass={per_pass} "
                        f"is not below the {per_process} workers per process (k/W = {k}/{W})")
    from .noise_scale import NoiseScaleProbe

    return NoiseScaleProbe(unwrap(model), optimizer, per_pass * n, k * n, grad_scale=k / (W * per_pass))


def _mean_over_ranks(values: list[float], device, W: int) -> list[float]:
    summed = D.reduce_scalars({str(i): v for i, v in enumerate(values)}, device)
    return [summed[str(i)] / W for i in range(len(values))]


def _print_header(cfg, run_dir, data, k, n, W, peak, ipe, iteration, complete: bool) -> None:
    resumed = f", resuming at iteration {iteration}" if iteration else ""
    if complete:
        resumed = "; this run is already complete (nothing to do)"
    print(
        f"lbsgd train: {cfg.model.arch} on {cfg.data.name} ({data.train_size} train / {data.val_size} val), "
        f"kn = {k}x{n} = {k * n} on {W} process(es), peak lr {peak:.4g}, {ipe} iters/epoch x "
        f"{cfg.schedule.epochs} epochs{resumed}\nrun dir: {run_dir}",
        flush=True,
    )


def _summary(run_dir: Path, last_val: dict[str, float], wall: float) -> dict[str, Any]:
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    epochs = [r for r in records if "val/err" in r]
    last5 = sorted(r["val/err"] for r in epochs[-5:])
    ips = [r["images_per_sec"] for r in epochs]
    return {
        "val_top1_err": last_val.get("top1_err"),
        "val_top5_err": last_val.get("top5_err"),
        "median_last5_val_err": last5[len(last5) // 2] if last5 else None,
        "train_err": epochs[-1]["train/err"] if epochs else None,
        "epochs": len(epochs),
        "wall_time_s": round(wall, 2),
        "images_per_sec": round(sum(ips) / len(ips), 1) if ips else None,
        "run_dir": str(run_dir),
    }


def _print_summary(s: dict[str, Any]) -> None:
    err = s["val_top1_err"]
    print(
        f"done: val top-1 error {err * 100:.2f}% (median of last 5 epochs "
        f"{s['median_last5_val_err'] * 100:.2f}%), wall time {s['wall_time_s']:.1f} s, "
        f"{s['images_per_sec']:.0f} images/s\n"
        f"run dir: {s['run_dir']}\ncurves: tensorboard --logdir {s['run_dir']}",
        flush=True,
    )
