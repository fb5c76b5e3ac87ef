"""Structured config schema for ``lbsgd train`` and early validation.

The dataclasses below are the *types* of the config tree; the YAML files in
``conf/`` only choose values. Hydra/OmegaConf reject unknown keys and values of
the wrong type (``batch.k=abc``, ``schedule.warmup=linear``) before anything
runs; :func:`validate` checks the rest (signs, ranges, consistency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

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
    num_workers: int = 2  # streaming loaders only
    cache_dir: Optional[str] = None  # decoded in-memory sets are cached here; None = ~/.cache/lbsgd
    mean: Optional[list[float]] = None  # None = computed from the training set (in memory) or ImageNet's
    std: Optional[list[float]] = None


@dataclass
class LogConfig:
    every: int = 10  # iterations between per-iteration records
    tensorboard: bool = True
    progress: str = "auto"  # auto | rich | plain | none


@dataclass
class CheckpointConfig:
    every_iters: int = 0  # extra checkpoints within an epoch; 0 = end of epoch only
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2"])  # checkpoint and exit 3


@dataclass
class TrainConfig:
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    deterministic: bool = True


def register_configs() -> None:
    """Make the schema available to the YAML tree as ``train_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


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
    if cfg.log.every <= 0:
        _fail("log.every", f"must be positive, got {cfg.log.every}")
    if cfg.log.progress not in ("auto", "rich", "plain", "none"):
        _fail("log.progress", f"must be auto, rich, plain or none, got {cfg.log.progress!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", f"must be auto, cpu or cuda, got {cfg.device!r}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
