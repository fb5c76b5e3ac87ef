"""Early checks of a composed config: what types cannot say (finite floats, signs, ranges, consistency).

Every check reads and nothing is rewritten: a bad value is a one-line :class:`~lbsgd_cli.errors.UserError`
naming the key (exit status 2, no traceback). ``cli.preflight`` runs :data:`VALIDATORS` on every composed
config of a call before Hydra starts; ``lbsgd train`` and ``lbsgd quantize`` run theirs again on the config
they were handed, then give its values one spelling (:func:`lbsgd_cli.config.normalise_train`,
:func:`lbsgd_cli.config.normalise_quantize`). The paper's constraints checked here: the minibatch ``k*n``
(§2.3), the rate rule and warmup (§2.1, §2.2), the schedule's drops inside the warmup (§5.1).
"""

from __future__ import annotations

import math
import signal
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .choices import (BUILTIN_NETWORKS, ROOTED_DATA, Backend, CommHook, CompileMode, DataName, Decay, Device,
                      Granularity, Labels, MomentumForm, OffloadMode, Optimizer, RangeMethod, Shortcut, Stem, Warmup)
from .config import SCHEMAS, as_list, bool_words, in_memory_mode, is_float_type, leaves
from .errors import UserError


def _fail(key: str, message: str) -> None:
    raise UserError(f"{key}: {message}")


def check_finite(cfg: Any, command: str) -> None:
    """Every float key (and float list) holds a finite number: ``nan`` and ``inf`` are one-line errors."""
    for key, kind, _ in leaves(SCHEMAS[command]):
        if not is_float_type(kind):
            continue
        value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None
        values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                _fail(key, f"must be a finite number, got {v}")


def validate(cfg: DictConfig | Any) -> None:
    """Check what types cannot: finite floats, signs, ranges and consistency. Raises :class:`UserError`."""
    check_finite(cfg, "train")
    b, o, s, m, d = cfg.batch, cfg.optim, cfg.schedule, cfg.model, cfg.data
    if m.arch not in BUILTIN_NETWORKS:  # the name first: the keys below depend on the network
        from .models import check_arch  # torchvision's list, imported only for a name that is not lbsgd's own

        check_arch(m.arch)
    check_data_root(d.name, d.root)
    for name in cfg.checkpoint.preempt_signals:  # before the run starts, not when it installs the handlers
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            _fail("checkpoint.preempt_signals", f"unknown signal {name!r}")
    positive = (("batch.k", b.k, "a positive number of workers"), ("batch.n", b.n, "a positive per-worker batch"),
                ("batch.eval_batch", b.eval_batch, "positive"), ("optim.base_lr", o.base_lr, "positive"),
                ("optim.ref_batch", o.ref_batch, "positive"), ("schedule.epochs", s.epochs, "positive"),
                ("log.every", cfg.log.every, "positive"),
                ("checkpoint.preempt_check_every", cfg.checkpoint.preempt_check_every, "positive"))
    if cfg.checkpoint.stop_after_epoch < 0:
        _fail("checkpoint.stop_after_epoch", f"must be >= 0 (0: never), got {cfg.checkpoint.stop_after_epoch}")
    for key, value, what in positive:
        if value <= 0:
            _fail(key, f"must be {what}, got {value}")
    if b.workers_per_pass != "auto" and (not isinstance(b.workers_per_pass, int) or isinstance(
            b.workers_per_pass, bool) or b.workers_per_pass < 0):
        _fail("batch.workers_per_pass", f"must be auto or a number of workers >= 0, got {b.workers_per_pass!r}")
    at_least_0 = (("optim.weight_decay", o.weight_decay),
                  ("schedule.warmup_epochs", s.warmup_epochs), ("data.train_subset", d.train_subset),
                  ("data.val_subset", d.val_subset))
    for key, value in at_least_0:
        if value < 0:
            _fail(key, f"must be >= 0, got {value}")
    check_num_workers(d.num_workers)
    if not 0 <= o.momentum < 1:
        _fail("optim.momentum", f"must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        _fail("optim.nesterov", "needs optim.momentum > 0")
    if not 0 < s.gamma <= 1:
        _fail("schedule.gamma", f"must be in (0, 1], got {s.gamma}")
    ms = list(s.milestones)
    if s.decay == Decay.step:
        if ms != sorted(ms) or any(x <= 0 for x in ms):
            _fail("schedule.milestones", f"must be increasing positive epochs, got {ms}")
        if s.warmup != Warmup.none and any(x < s.warmup_epochs for x in ms):
            _fail("schedule.milestones", f"a rate drop {ms} falls inside the {s.warmup_epochs}-epoch warmup")
    else:
        if s.poly_power <= 0:
            _fail("schedule.poly_power", f"must be positive, got {s.poly_power}")
        if s.warmup != Warmup.none and s.warmup_epochs >= s.epochs:
            _fail("schedule.warmup_epochs", f"{s.decay} decay needs epochs after the warmup: warmup "
                  f"{s.warmup_epochs} of {s.epochs} epochs")
    if m.arch == "cifar_resnet" and (m.depth < 8 or (m.depth - 2) % 6):
        _fail("model.depth", f"a CIFAR ResNet has depth 6m+2 (8, 20, 56, ...), got {m.depth}")
    in_memory_mode(d.in_memory)  # one of auto, true, false in any spelling (config.normalise_train gives it one)
    if d.name == DataName.imagefolder and not d.root:
        _fail("data.root", "is required with data=imagefolder (the folder holding train/ and val/)")
    _validate_cifar(cfg)
    if cfg.dist.backend == Backend.nccl and cfg.device == Device.cpu:
        _fail("dist.backend", "nccl needs CUDA devices; use gloo (or auto) with device=cpu")
    if not cfg.dist.timeout_s > 0:
        _fail("dist.timeout_s", f"must be a positive number of seconds, got {cfg.dist.timeout_s}")
    for key, value in (("model.channels_last", m.channels_last), ("deterministic", cfg.deterministic)):
        if value != "auto" and not isinstance(value, bool):
            _fail(key, f"must be auto, true or false, got {value!r}")
    if cfg.compile_mode != CompileMode.default and not cfg.compile:
        _fail("compile_mode", f"{cfg.compile_mode} is a torch.compile mode; it needs compile=true")
    _validate_train_memory(cfg)
    _validate_beyond(cfg)


def check_data_root(name: DataName | str, root: str | None, key: str = "data.root") -> None:
    """``data.root`` (``key``) only where the data set reads it (:data:`ROOTED_DATA`): the embedded digits
    have no folder, and a root given with them would be silently ignored."""
    if root and name not in ROOTED_DATA:
        _fail(key, f"has no meaning for data={name} (the embedded 8x8 digits come with scikit-learn, "
              f"from no folder); data={', '.join(map(str, ROOTED_DATA))} read it")


def _validate_cifar(cfg: DictConfig | Any) -> None:
    """``data=cifar10`` / ``data=cifar100`` (torchvision's batches, always in memory) and the keys only they read."""
    d, m = cfg.data, cfg.model
    cifar = d.name in (DataName.cifar10, DataName.cifar100)
    if cifar and not d.root:
        folder = "cifar-10-batches-py" if d.name == DataName.cifar10 else "cifar-100-python"
        _fail("data.root", f"is required with data={d.name} (the folder holding {folder}/, or where "
              "data.download=true puts it)")
    if cifar and in_memory_mode(d.in_memory) == "false":
        _fail("data.in_memory", f"data={d.name} is read into memory (torchvision's batches); false is for "
              "ImageFolder trees")
    if d.labels == Labels.coarse and d.name != DataName.cifar100:
        _fail("data.labels", f"coarse labels are CIFAR-100's 20 superclasses; data={d.name} has only its own")
    if d.download and not cifar:
        _fail("data.download", f"fetches CIFAR-10/100 through torchvision; data={d.name} is not downloaded")
    if m.shortcut != Shortcut.A and m.arch != "cifar_resnet":
        _fail("model.shortcut", f"chooses a CIFAR ResNet's shortcut (model.arch=cifar_resnet); {m.arch} builds its own")
    if m.stem == Stem.cifar and not m.arch.startswith(("resnet", "resnext", "wide_resnet")):
        _fail("model.stem", f"cifar replaces a torchvision ResNet's first conv and max pool; {m.arch} has none "
              "(resnet18, resnet50, ...)")


def _validate_beyond(cfg: DictConfig | Any) -> None:
    """LARS, compressed allreduce and the gradient noise scale (issue 8, beyond the paper)."""
    o, d = cfg.optim, cfg.dist
    if not o.lars_eta > 0:
        _fail("optim.lars_eta", f"must be a positive trust coefficient, got {o.lars_eta}")
    if o.name == Optimizer.lars and o.momentum_form == MomentumForm.paper:
        _fail("optim.momentum_form", "lars uses the pytorch form (v = m*v + local_lr*g; w -= lr*v); set pytorch")
    if d.powersgd_rank <= 0:
        _fail("dist.powersgd_rank", f"must be a positive matrix rank, got {d.powersgd_rank}")
    if d.powersgd_start_iter < 2:
        _fail("dist.powersgd_start_iter", f"must be >= 2 (PowerSGD starts after DDP's first steps), "
              f"got {d.powersgd_start_iter}")
    if d.comm_hook != CommHook.none and cfg.memory.fsdp:
        _fail("dist.comm_hook", "is a DDP communication hook; memory.fsdp reduce-scatters with FSDP2 instead")
    if cfg.log.noise_scale:
        b = cfg.batch
        if b.workers_per_pass == "auto" or not 0 < b.workers_per_pass < b.k:
            _fail("log.noise_scale", f"needs >= 2 forward passes per step: set 0 < batch.workers_per_pass < k/W "
                  f"(k = {b.k}), got {b.workers_per_pass}")
        if cfg.memory.fsdp:
            _fail("log.noise_scale", "reads whole local gradients; not available with memory.fsdp")


# Why each offload mode cannot serve training (the reason is the error message).
TRAIN_OFFLOAD_REJECTED = {
    OffloadMode.sequential: "accelerate's cpu_offload keeps the weights off the model between forwards and does "
    "not carry gradients or optimizer state; it is an inference tool (use memory.checkpointing=true to save "
    "training memory)",
    OffloadMode.model: "whole-model offloading frees the accelerator only between uses of a model, and training "
    "uses its one model at every step; it serves evaluation (lbsgd eval offload.mode=model)",
}


def _validate_train_memory(cfg: DictConfig | Any) -> None:
    mode = cfg.offload.mode
    if mode != OffloadMode.none:
        _fail("offload.mode", f"{mode} cannot be used in training: {TRAIN_OFFLOAD_REJECTED[mode]}")
    arch = cfg.model.arch
    has_stages = arch == "cifar_resnet" or arch.startswith(("resnet", "resnext", "wide_resnet"))
    if cfg.memory.checkpointing and not has_stages:
        _fail("memory.checkpointing", f"checkpoints ResNet stages; {arch} has none (cifar_resnet, resnet*, resnext*)")
    if cfg.memory.fsdp_cpu_offload and not cfg.memory.fsdp:
        _fail("memory.fsdp_cpu_offload", "offloads FSDP2's shards; it needs memory.fsdp=true")
    if cfg.memory.fsdp and cfg.device == Device.cuda and cfg.dist.backend == Backend.gloo:
        _fail("memory.fsdp", "FSDP2 on CUDA needs NCCL's reduce-scatter; use dist.backend=nccl (or auto)")


def validate_eval(cfg: DictConfig | Any) -> None:
    """Early checks of ``lbsgd eval`` (the checkpoint itself is read later)."""
    check_finite(cfg, "eval")
    if OmegaConf.is_missing(cfg, "checkpoint") or not str(cfg.checkpoint).strip():
        _fail("checkpoint", "give the checkpoint to evaluate: lbsgd eval checkpoint=PATH")
    if cfg.eval.bn_recompute < 0:
        _fail("eval.bn_recompute", f"must be >= 0 training minibatches (0 = off), got {cfg.eval.bn_recompute}")
    if cfg.eval.batch < 0:
        _fail("eval.batch", f"must be >= 0 (0 = the checkpoint's batch.eval_batch), got {cfg.eval.batch}")
    if cfg.data.num_workers is not None:
        check_num_workers(cfg.data.num_workers)


def check_num_workers(value: Any) -> None:
    """``data.num_workers``: "auto" or an integer >= 0 (a digit string from the command line counts)."""
    if value == "auto":
        return
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        _fail("data.num_workers", f'must be "auto" or an integer >= 0, got {value!r}')
    if int(value) < 0:
        _fail("data.num_workers", f"must be >= 0, got {value}")


def validate_quantize(cfg: DictConfig | Any) -> None:
    """``lbsgd quantize``: bits in 2..8, known granularity and method, a checkpoint file (the words of
    ``quant.symmetric``/``quant.activations`` are checked here and made bools by :func:`lbsgd_cli.config.normalise_quantize`)."""
    check_finite(cfg, "quantize")
    q = cfg.quant
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        _fail("checkpoint", "is required: lbsgd quantize checkpoint=PATH (a checkpoint of lbsgd train)")
    for key, values in (("bits", as_list(q.bits)), ("act_bits", [] if q.act_bits is None else [q.act_bits])):
        for b in values:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                _fail(f"quant.{key}", f"must be an integer from 2 to 8 (or a list of them), got {b!r}")
    for key, allowed in (("granularity", Granularity), ("method", RangeMethod)):
        for v in as_list(q[key]):
            if v not in {c.value for c in allowed}:
                _fail(f"quant.{key}", f"unknown {key} {v!r} ({', '.join(c.value for c in allowed)})")
    for key in ("symmetric", "activations"):  # Any (one value or a list): the words a bool key takes count
        if any(not isinstance(v, bool) for v in bool_words(q[key])):
            _fail(f"quant.{key}", f"must be true or false (or a list of them), got {q[key]!r}")
    if not 50 < q.percentile <= 100:
        _fail("quant.percentile", f"must be in (50, 100], got {q.percentile}")
    for key in ("calib_batches", "calib_batch_size", "latency_batch", "latency_reps"):
        if q[key] <= 0:
            _fail(f"quant.{key}", f"must be positive, got {q[key]}")
    if cfg.eval_batch <= 0:
        _fail("eval_batch", f"must be positive, got {cfg.eval_batch}")
    if cfg.val_subset < 0:
        _fail("val_subset", f"must be >= 0, got {cfg.val_subset}")


# Early checks per command (cli.preflight runs them on every composed config of a call).
def validate_plan(cfg: DictConfig | Any) -> None:
    """``lbsgd plan``: positive counts and rates, a known GPU, paths that exist."""
    from pathlib import Path

    from .plan import GPU_TABLE

    check_finite(cfg, "plan")
    p = cfg.plan
    for key in ("gpus", "gpus_per_node", "n", "num_classes", "dataset_size", "powersgd_rank"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] <= 0:
            _fail(f"plan.{key}", f"must be a positive integer, got {p[key]!r}")
    for key in ("intra_gbit", "inter_gbit", "epochs"):
        if not p[key] > 0:
            _fail(f"plan.{key}", f"must be positive, got {p[key]}")
    for key in ("intra_latency_us", "inter_latency_us", "bucket_mb", "first_bucket_mb", "loader_cores_per_node",
                "decode_ms_per_image"):
        if p[key] < 0:
            _fail(f"plan.{key}", f"must be >= 0, got {p[key]}")
    if not 0 < p.backward_fraction <= 1:
        _fail("plan.backward_fraction", f"must be in (0, 1], got {p.backward_fraction}")
    if p.images_per_s is not None and not p.images_per_s > 0:
        _fail("plan.images_per_s", f"must be a positive number of images/s, got {p.images_per_s}")
    if p.images_per_s is None and p.gpu_bench is None and p.gpu not in GPU_TABLE:
        _fail("plan.gpu", f"unknown GPU {p.gpu!r} (published figures: {', '.join(GPU_TABLE)}; or give "
              "plan.images_per_s=N or plan.gpu_bench=bench_gpu.json)")
    for key in ("gpu_bench", "run_dir", "noise_run"):
        if p[key] is not None and not Path(p[key]).exists():
            _fail(f"plan.{key}", f"{p[key]} does not exist")
    if (loader := p.loader_cores_per_node > 0) != (p.decode_ms_per_image > 0):
        _fail("plan.loader_cores_per_node" if not loader else "plan.decode_ms_per_image",
              "the loader is modelled with both plan.loader_cores_per_node and plan.decode_ms_per_image (or neither)")


VALIDATORS: dict[str, Callable[[Any], None]] = {"train": validate, "quantize": validate_quantize, "plan": validate_plan,
                                                "eval": validate_eval}
