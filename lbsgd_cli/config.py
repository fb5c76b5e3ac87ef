"""Structured config schema for ``lbsgd train`` and early validation.

The dataclasses below are the *types* of the config tree; the YAML files in
``conf/`` only choose values. Hydra/OmegaConf reject unknown keys and values of
the wrong type (``batch.k=abc``, ``schedule.warmup=linear``) before anything
runs; :func:`validate` checks the rest (signs, ranges, consistency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError


class Warmup(Enum):
    """Warmup modes of §2.2: ``gradual`` (the paper's), ``constant`` (ablation) and ``none``."""

    gradual = "gradual"
    constant = "constant"
    none = "none"


class LRRule(Enum):
    """How the peak rate follows ``k*n`` (§2.1, Table 2a)."""

    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class MomentumForm(Enum):
    """Update form of Remark 2: PyTorch's ``v=m*v+g; w-=lr*v`` or the paper's eq. (10)."""

    pytorch = "pytorch"
    paper = "paper"


@dataclass
class BatchConfig:
    """The minibatch ``k*n`` (§2.3). ``n`` is also the BatchNorm batch."""

    k: int = 4  # workers in the paper's sense (simulated when k > processes)
    n: int = 32  # samples per worker = BN batch
    workers_per_pass: int = 0  # workers in one forward pass; 0 = all of a process's workers
    eval_batch: int = 256  # images per forward pass at evaluation (no effect on results)


@dataclass
class OptimConfig:
    """SGD with momentum (§5.1); ``lr = base_lr * k*n / ref_batch`` under the linear rule."""

    base_lr: float = 0.1
    ref_batch: int = 256
    lr_rule: LRRule = LRRule.linear
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    bn_weight_decay: bool = False  # §5.1: no weight decay on BN gamma and beta
    bias_weight_decay: bool = True
    momentum_form: MomentumForm = MomentumForm.pytorch
    momentum_correction: bool = True  # Remark 2; only meaningful with momentum_form=paper
    name: str = "sgd"  # sgd | lars (You et al. 2017: per-layer trust ratio on conv/linear weights; optim=lars)
    lars_eta: float = 0.001  # lars: trust coefficient eta, local lr = eta*|w| / (|g| + wd*|w|)


@dataclass
class ScheduleConfig:
    """Step schedule with warmup (§2.2, §5.1)."""

    epochs: int = 90
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1
    warmup: Warmup = Warmup.gradual
    warmup_epochs: float = 5.0


@dataclass
class ModelConfig:
    """Network and its initialisation (§5.1)."""

    arch: str = MISSING  # small_cnn | cifar_resnet | any torchvision classifier name
    depth: int = 20  # cifar_resnet only: 6m+2
    width: int = 32  # small_cnn only: channels of the first conv
    zero_init_residual: bool = True  # §5.1: gamma=0 in each residual block's last BN
    bn_momentum: float = 0.1  # PyTorch convention; the paper's 0.9
    bn_eps: float = 1e-5
    fc_init_std: float = 0.01  # final FC from N(0, 0.01^2)
    # NHWC (torch.channels_last) weights and activations: the same network, faster convolutions on GPUs
    # and oneDNN CPUs; conv kernels then sum in another order, so results differ in the last bits and the
    # key names the run like any other
    channels_last: bool = False


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    name: str = MISSING  # digits | imagefolder
    root: Optional[str] = None
    in_memory: str = "auto"  # auto | true | false
    in_memory_max_gb: float = 4.0  # auto: decode into memory below this size
    crop_size: int = 224  # ImageNet-sized images: RandomResizedCrop size
    val_resize: int = 256  # ImageNet-sized images: val resize before centre crop
    small_image_max: int = 64  # images up to this side are "small": pad-and-crop + flip
    pad: int = 4  # small images: padding of the random crop
    flip: bool = True  # random horizontal flip (off for digits, where it changes the class)
    train_subset: int = 0  # use only this many training images (stratified); 0 = all
    val_fraction: float = 0.2  # digits only: held-out share
    val_subset: int = 0  # imagefolder: evaluate on this many val images (stratified, fixed); 0 = all
    num_workers: int = 2  # streaming loaders only
    cache_dir: Optional[str] = None  # decoded in-memory sets are cached here; None = ~/.cache/lbsgd
    mean: Optional[list[float]] = None  # None = computed from the training set (in memory) or ImageNet's
    std: Optional[list[float]] = None


@dataclass
class LogConfig:
    every: int = 10  # iterations between per-iteration records
    tensorboard: bool = True
    progress: str = "auto"  # auto | rich | plain | none
    # gradient noise scale B_simple (McCandlish et al. 2018) as train/noise_scale every log.every iterations;
    # needs >= 2 forward passes per step (batch.workers_per_pass < k/W); read-only, no effect on the result
    noise_scale: bool = False


@dataclass
class CheckpointConfig:
    every_iters: int = 0  # extra checkpoints within an epoch; 0 = end of epoch only
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2"])  # checkpoint and exit 3


@dataclass
class DistConfig:
    """Process group of a multi-process run (torchrun, srun). ``backend``, ``timeout_s`` and ``requeue``
    have no effect on the result (§4); a compressing ``comm_hook`` has (it is part of the run's identity)."""

    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    timeout_s: float = 600.0  # a rank that waits this long for the others (one died or hangs) exits with status 4
    requeue: bool = False  # on SLURM, rank 0 runs `scontrol requeue $SLURM_JOB_ID` after a preemption checkpoint
    # DDP communication hook compressing the gradient allreduce: none (fp32) | fp16 | bf16 | powersgd.
    # A no-op on a single process (there is no allreduce) and not available with memory.fsdp.
    comm_hook: str = "none"
    powersgd_rank: int = 1  # powersgd: rank r of the low-rank approximation P Q^T of each matrix-shaped gradient
    powersgd_start_iter: int = 2  # powersgd: plain allreduce before this step (torch's >= 2; its default is 1000)


OFFLOAD_MODES = ("none", "sequential", "model")
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
OPTIMIZERS = ("sgd", "lars")


@dataclass
class OffloadConfig:
    """Seminar, "Reduce memory usage": CPU offloading (``sequential``) and model offloading (``model``).

    Evaluation takes all three modes; training only ``none`` (see :func:`validate`)."""

    mode: str = "none"  # none | sequential (per submodule, accelerate.cpu_offload) | model (cpu_offload_with_hook)


@dataclass
class MemoryConfig:
    """Training-memory levers that leave the result unchanged."""

    checkpointing: bool = False  # recompute each ResNet stage's activations in backward (torch.utils.checkpoint)
    fsdp: bool = False  # FSDP2: shard parameters, gradients and optimizer state over the processes (torchrun, >= 2)
    fsdp_cpu_offload: bool = False  # with fsdp: shards, gradients and optimizer state in CPU memory, step on the CPU


@dataclass
class TrainConfig:
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    deterministic: bool = True
    # autocast precision of forward and loss: fp32 | bf16 (weights, gradients, optimizer state and BN
    # statistics stay fp32). Changes the result in the last bits, so it names the run.
    precision: str = "fp32"


@dataclass
class QuantConfig:
    """b-bit affine quantization (seminar, "Quantization"). ``bits``, ``granularity``, ``symmetric``,
    ``method`` and ``activations`` take one value or a list; lists give one row per combination."""

    bits: Any = 8  # 2..8, or a list such as [8, 6, 4, 3, 2]
    granularity: Any = "per_channel"  # per_channel (one (s, z) per output channel) | per_tensor
    symmetric: Any = True  # narrow signed range, z = 0 | false: asymmetric, integer z
    method: Any = "minmax"  # range setting: minmax | mse (clipping grid search) | percentile
    activations: Any = False  # also quantize the input of every conv/linear (per tensor, asymmetric)
    act_bits: Optional[int] = None  # bits of the activations; None = quant.bits
    percentile: float = 99.99  # method=percentile: [P_(100-p), P_p]
    calib_batches: int = 8  # training batches that calibrate the activation ranges
    calib_batch_size: int = 128
    int8_backend: bool = False  # also run real int8 kernels (torchao pt2e + inductor) and time them vs fp32
    latency_batch: int = 32
    latency_reps: int = 30


@dataclass
class QuantizeConfig:
    checkpoint: str = MISSING  # a checkpoint written by lbsgd train
    quant: QuantConfig = field(default_factory=QuantConfig)
    data_root: Optional[str] = None  # the data set's folder now; None = the path recorded in the checkpoint
    eval_batch: int = 256
    val_subset: int = 0  # evaluate on a stratified subset of this many val images; 0 = all
    device: str = "cpu"  # cpu | cuda | auto (the integer kernels are CPU kernels)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    seed: int = 0  # which training images calibrate


@dataclass
class EvalOptions:
    bn_recompute: int = 0  # training minibatches (k*n each, BN over n) that recompute BN statistics; 0 = off
    batch: int = 0  # images per forward pass; 0 = the checkpoint's batch.eval_batch


@dataclass
class EvalDataConfig:
    """Where the checkpoint's data set lives now; None keeps the value stored in the checkpoint."""

    root: Optional[str] = None
    cache_dir: Optional[str] = None
    num_workers: Optional[int] = None


@dataclass
class EvalConfig:
    """``lbsgd eval``: network and data set come from the checkpoint's stored config."""

    checkpoint: str = MISSING
    eval: EvalOptions = field(default_factory=EvalOptions)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    device: str = "auto"  # auto | cpu | cuda: the execution device
    threads: int = 0  # torch intra-op threads; 0 = torch's default


def register_configs() -> None:
    """Make the schema available to the YAML tree as ``train_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="quantize_schema", node=QuantizeConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def _fail(key: str, message: str) -> None:
    raise UserError(f"{key}: {message}")


def validate(cfg: DictConfig | Any) -> None:
    """Check what types cannot: signs, ranges and consistency. Raises :class:`UserError`."""
    b, o, s, m, d = cfg.batch, cfg.optim, cfg.schedule, cfg.model, cfg.data
    if b.k <= 0:
        _fail("batch.k", f"must be a positive number of workers, got {b.k}")
    if b.n <= 0:
        _fail("batch.n", f"must be a positive per-worker batch, got {b.n}")
    if b.eval_batch <= 0:
        _fail("batch.eval_batch", f"must be positive, got {b.eval_batch}")
    if b.workers_per_pass < 0:
        _fail("batch.workers_per_pass", f"must be >= 0, got {b.workers_per_pass}")
    if o.base_lr <= 0:
        _fail("optim.base_lr", f"must be positive, got {o.base_lr}")
    if o.ref_batch <= 0:
        _fail("optim.ref_batch", f"must be positive, got {o.ref_batch}")
    if not 0 <= o.momentum < 1:
        _fail("optim.momentum", f"must be in [0, 1), got {o.momentum}")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.nesterov and o.momentum == 0:
        _fail("optim.nesterov", "needs optim.momentum > 0")
    if s.epochs <= 0:
        _fail("schedule.epochs", f"must be positive, got {s.epochs}")
    if s.warmup_epochs < 0:
        _fail("schedule.warmup_epochs", f"must be >= 0, got {s.warmup_epochs}")
    if not 0 < s.gamma <= 1:
        _fail("schedule.gamma", f"must be in (0, 1], got {s.gamma}")
    ms = list(s.milestones)
    if ms != sorted(ms) or any(x <= 0 for x in ms):
        _fail("schedule.milestones", f"must be increasing positive epochs, got {ms}")
    if s.warmup != Warmup.none and any(x < s.warmup_epochs for x in ms):
        _fail("schedule.milestones", f"a rate drop {ms} falls inside the {s.warmup_epochs}-epoch warmup")
    if m.arch == "cifar_resnet" and (m.depth < 8 or (m.depth - 2) % 6):
        _fail("model.depth", f"a CIFAR ResNet has depth 6m+2 (8, 20, 56, ...), got {m.depth}")
    if d.in_memory not in ("auto", "true", "false"):
        _fail("data.in_memory", f"must be auto, true or false, got {d.in_memory!r}")
    if d.name not in ("digits", "imagefolder"):
        _fail("data.name", f"unknown data set {d.name!r} (digits, imagefolder)")
    if d.name == "imagefolder" and not d.root:
        _fail("data.root", "is required with data=imagefolder (the folder holding train/ and val/)")
    if d.train_subset < 0:
        _fail("data.train_subset", f"must be >= 0, got {d.train_subset}")
    if d.val_subset < 0:
        _fail("data.val_subset", f"must be >= 0, got {d.val_subset}")
    if cfg.log.every <= 0:
        _fail("log.every", f"must be positive, got {cfg.log.every}")
    if cfg.log.progress not in ("auto", "rich", "plain", "none"):
        _fail("log.progress", f"must be auto, rich, plain or none, got {cfg.log.progress!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", f"must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        _fail("dist.backend", f"must be auto, nccl or gloo, got {cfg.dist.backend!r}")
    if cfg.dist.backend == "nccl" and cfg.device == "cpu":
        _fail("dist.backend", "nccl needs CUDA devices; use gloo (or auto) with device=cpu")
    if not cfg.dist.timeout_s > 0:
        _fail("dist.timeout_s", f"must be a positive number of seconds, got {cfg.dist.timeout_s}")
    if cfg.precision not in ("fp32", "bf16"):
        _fail("precision", f"must be fp32 or bf16, got {cfg.precision!r}")
    _validate_train_memory(cfg)
    _validate_beyond(cfg)


def _validate_beyond(cfg: DictConfig | Any) -> None:
    """LARS, compressed allreduce and the gradient noise scale (issue 8, beyond the paper)."""
    o, d = cfg.optim, cfg.dist
    if o.name not in OPTIMIZERS:
        _fail("optim.name", f"unknown optimizer {o.name!r} ({', '.join(OPTIMIZERS)})")
    if not o.lars_eta > 0:
        _fail("optim.lars_eta", f"must be a positive trust coefficient, got {o.lars_eta}")
    if o.name == "lars" and MomentumForm(o.momentum_form) == MomentumForm.paper:
        _fail("optim.momentum_form", "lars uses the pytorch form (v = m*v + local_lr*g; w -= lr*v); set pytorch")
    if d.comm_hook not in COMM_HOOKS:
        _fail("dist.comm_hook", f"unknown communication hook {d.comm_hook!r} ({', '.join(COMM_HOOKS)})")
    if d.powersgd_rank <= 0:
        _fail("dist.powersgd_rank", f"must be a positive matrix rank, got {d.powersgd_rank}")
    if d.powersgd_start_iter < 2:
        _fail("dist.powersgd_start_iter", f"must be >= 2 (PowerSGD starts after DDP's first steps), "
              f"got {d.powersgd_start_iter}")
    if d.comm_hook != "none" and cfg.memory.fsdp:
        _fail("dist.comm_hook", "is a DDP communication hook; memory.fsdp reduce-scatters with FSDP2 instead")
    if cfg.log.noise_scale:
        b = cfg.batch
        if not 0 < b.workers_per_pass < b.k:
            _fail("log.noise_scale", f"needs >= 2 forward passes per step: set 0 < batch.workers_per_pass < k/W "
                  f"(k = {b.k}), got {b.workers_per_pass}")
        if cfg.memory.fsdp:
            _fail("log.noise_scale", "reads whole local gradients; not available with memory.fsdp")


# Why each offload mode cannot serve training (the reason is the error message).
TRAIN_OFFLOAD_REJECTED = {
    "sequential": "accelerate's cpu_offload keeps the weights off the model between forwards and does not "
    "carry gradients or optimizer state; it is an inference tool (use memory.checkpointing=true to save "
    "training memory)",
    "model": "whole-model offloading frees the accelerator only between uses of a model, and training uses "
    "its one model at every step; it serves evaluation (lbsgd eval offload.mode=model)",
}


def _validate_train_memory(cfg: DictConfig | Any) -> None:
    mode = cfg.offload.mode
    if mode not in OFFLOAD_MODES:
        _fail("offload.mode", f"must be none, sequential or model, got {mode!r}")
    if mode != "none":
        _fail("offload.mode", f"{mode} cannot be used in training: {TRAIN_OFFLOAD_REJECTED[mode]}")
    arch = cfg.model.arch
    has_stages = arch == "cifar_resnet" or arch.startswith(("resnet", "resnext", "wide_resnet"))
    if cfg.memory.checkpointing and not has_stages:
        _fail("memory.checkpointing", f"checkpoints ResNet stages; {arch} has none (cifar_resnet, resnet*, resnext*)")
    if cfg.memory.fsdp_cpu_offload and not cfg.memory.fsdp:
        _fail("memory.fsdp_cpu_offload", "offloads FSDP2's shards; it needs memory.fsdp=true")
    if cfg.memory.fsdp and cfg.device == "cuda" and cfg.dist.backend == "gloo":
        _fail("memory.fsdp", "FSDP2 on CUDA needs NCCL's reduce-scatter; use dist.backend=nccl (or auto)")


def validate_eval(cfg: DictConfig | Any) -> None:
    """Early checks of ``lbsgd eval`` (the checkpoint itself is read later)."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not str(cfg.checkpoint).strip():
        _fail("checkpoint", "give the checkpoint to evaluate: lbsgd eval checkpoint=PATH")
    if cfg.eval.bn_recompute < 0:
        _fail("eval.bn_recompute", f"must be >= 0 training minibatches (0 = off), got {cfg.eval.bn_recompute}")
    if cfg.eval.batch < 0:
        _fail("eval.batch", f"must be >= 0 (0 = the checkpoint's batch.eval_batch), got {cfg.eval.batch}")
    if cfg.offload.mode not in OFFLOAD_MODES:
        _fail("offload.mode", f"must be none, sequential or model, got {cfg.offload.mode!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", f"must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.data.num_workers is not None and cfg.data.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_list(value: Any) -> list[Any]:
    """A config value that may be one value or a list, as a list."""
    return list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else [value]


def validate_quantize(cfg: DictConfig | Any) -> None:
    """``lbsgd quantize``: bits in 2..8, known granularity and method, a checkpoint file."""
    q = cfg.quant
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        _fail("checkpoint", "is required: lbsgd quantize checkpoint=PATH (a checkpoint of lbsgd train)")
    for key, values in (("bits", as_list(q.bits)), ("act_bits", [] if q.act_bits is None else [q.act_bits])):
        for b in values:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                _fail(f"quant.{key}", f"must be an integer from 2 to 8 (or a list of them), got {b!r}")
    for key, allowed in (("granularity", ("per_channel", "per_tensor")), ("method", ("minmax", "mse", "percentile"))):
        for v in as_list(q[key]):
            if v not in allowed:
                _fail(f"quant.{key}", f"unknown {key} {v!r} ({', '.join(allowed)})")
    for key in ("symmetric", "activations"):
        if any(not isinstance(v, bool) for v in as_list(q[key])):
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
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", f"must be auto, cpu or cuda, got {cfg.device!r}")


# Early checks per command (cli.preflight runs them on every composed config of a call).
# Commands added later register theirs here: VALIDATORS["eval"] = validate_eval, ...
VALIDATORS: dict[str, Callable[[Any], None]] = {"train": validate}
VALIDATORS["quantize"] = validate_quantize
VALIDATORS["eval"] = validate_eval
