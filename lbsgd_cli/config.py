"""Structured config schema for ``lbsgd train`` and early validation.

The dataclasses below are the *types* of the config tree; the YAML files in
``conf/`` only choose values. Hydra/OmegaConf reject unknown keys and values of
the wrong type (``batch.k=abc``, ``schedule.warmup=linear``) before anything
runs; :func:`validate` checks the rest (signs, ranges, consistency).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .choices import (BUILTIN_NETWORKS, ROOTED_DATA, Backend, BNKernel, CommHook, CompileMode, DataName, Decay,
                      Decode, Device, EvalPrecision, Granularity, Labels, LRRule, MomentumForm, OffloadMode,
                      Optimizer, Precision, Progress, RangeMethod, Shortcut, Stem, Warmup)
from .errors import UserError

# Field metadata of a key whose value does not change the result (weights, metrics): it does not name
# the run directory, may change when a run resumes, and is left out of `lbsgd eval`'s folder name.
# A whole sub-config marked so (``log``) makes every key under it such a key. See :func:`no_effect_keys`.
NO_EFFECT = {"result": False}


def no_effect(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A dataclass field that does not change the result (see :data:`NO_EFFECT`)."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=NO_EFFECT)
    return field(default=default, metadata=NO_EFFECT)


@dataclass
class BatchConfig:
    """The minibatch ``k*n`` (§2.3). ``n`` is also the BatchNorm batch."""

    k: int = 4  # workers in the paper's sense (simulated when k > processes)
    n: int = 32  # samples per worker = BN batch
    # workers in one forward pass: auto (engine.pass_workers: cache-sized passes on a CPU, all of a process's
    # workers on a GPU) | 0 (all of them) | a number. Same result up to float roundoff (README, "Guarantee").
    workers_per_pass: Any = no_effect("auto")
    eval_batch: int = no_effect(256)  # images per forward pass at evaluation


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
    # sgd | lars (You et al. 2017: per-layer trust ratio on conv/linear weights). Chosen with the group,
    # `optim=lars`, which also sets LARS's base_lr; `optim.name=...` on the command line is refused (cli.py).
    name: Optimizer = Optimizer.sgd
    lars_eta: float = 0.001  # lars: trust coefficient eta, local lr = eta*|w| / (|g| + wd*|w|)


@dataclass
class ScheduleConfig:
    """Step schedule with warmup (§2.2, §5.1); beyond the paper, poly or cosine decay after warmup."""

    epochs: int = 90
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # decay=step only
    gamma: float = 0.1  # decay=step only
    warmup: Warmup = Warmup.gradual
    warmup_epochs: float = 5.0
    decay: Decay = Decay.step  # step (§5.1) | poly (You et al. 2017) | cosine (Loshchilov & Hutter 2017)
    poly_power: float = 2.0  # decay=poly: peak * (1 - progress)**poly_power


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
    # key names the run like any other. auto | true | false; auto: true on a CUDA device with bf16, false
    # elsewhere (lbsgd_cli/device_defaults.py; the run's config.yaml records the resolved value)
    channels_last: Any = "auto"
    # training-mode BN (ghost BN over n, §2.3): native (PyTorch's kernel, one call per worker's slice) |
    # fused (one torch.compile-generated kernel for all workers of a pass, statistics in fp32; needs
    # torch.compile's C++ compiler on a CPU). Sums in another order, so results differ in the last bits and
    # the key names the run. Measured in results/performance.md.
    bn_kernel: BNKernel = BNKernel.native
    # torchvision ResNets only: imagenet (7x7/2 conv + max pool, as torchvision builds them) | cifar (one 3x3/1
    # conv, no pool: ResNet-18 on 32x32 images as the CIFAR-100 warmup replication ran it)
    stem: Stem = Stem.imagenet
    # cifar_resnet only: the shortcut of the blocks that change shape (He et al. 2016, §3.3): A (subsample and
    # zero-pad, parameter-free: He et al.'s CIFAR networks) | B (projection: a strided 1x1 conv and a BN of its
    # own, as ResNet-50's; zero-gamma does not touch that BN). Table 2b's cause on this project's networks.
    shortcut: Shortcut = Shortcut.A


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    name: DataName = MISSING  # digits | imagefolder | cifar10 | cifar100
    root: Optional[str] = no_effect(None)
    # cifar10 / cifar100 (torchvision's pickled batches, lbsgd_cli/cifar.py): fetch them into data.root through
    # torchvision when they are not there; the files are the same md5-checked ones, so no effect on the result
    download: bool = no_effect(False)
    # cifar10 / cifar100: check each batch file's md5 against torchvision's list; a mismatch is an error.
    # false reads the files unchecked (and says so in one warning line): a checked file gives the same result
    verify: bool = no_effect(True)
    labels: Labels = Labels.fine  # cifar100: its 100 fine classes or its 20 coarse superclasses
    # auto | true | false. Any, not str or an Enum: Hydra hands `data.in_memory=true` over as a bool (a str
    # field would make it 'True'); validate() turns every spelling into "auto", "true" or "false"
    in_memory: Any = "auto"
    in_memory_max_gb: float = 4.0  # auto: decode into memory below this size
    crop_size: int = 224  # ImageNet-sized images: RandomResizedCrop size
    val_resize: int = 256  # ImageNet-sized images: val resize before centre crop
    small_image_max: int = 64  # images up to this side are "small": pad-and-crop + flip
    pad: int = 4  # small images: padding of the random crop
    flip: bool = True  # random horizontal flip (off for digits, where it changes the class)
    train_subset: int = 0  # use only this many training images (stratified); 0 = all
    val_fraction: float = 0.2  # digits only: held-out share
    val_subset: int = 0  # imagefolder: evaluate on this many val images (stratified, fixed); 0 = all
    # false: the first file that cannot be decoded (empty, truncated, not an image, a decompression bomb,
    # unreadable) stops the run with one line naming it; true: such files are skipped (left out before
    # training, or replaced by the next good file when a loader worker meets them) and counted in the header
    # and as data/bad_files in metrics.jsonl (lbsgd_cli/bad_data.py). Names the run: the samples may differ
    skip_bad: bool = False
    # streaming loaders only: DataLoader worker processes, or "auto" = the CPUs this process may use (its
    # affinity, or SLURM's CPUs per task shared by the ranks of one task) less one for training
    # (lbsgd_cli.streaming.resolve_num_workers). Any, not int, so that "auto" and 8 both parse
    num_workers: Any = no_effect("auto")
    cache_dir: Optional[str] = no_effect(None)  # decoded in-memory sets are cached here; None = ~/.cache/lbsgd
    # streaming loaders only: cpu (the workers: libjpeg-turbo, PIL's pixels; PIL for CMYK/PNG/odd files) |
    # gpu (decode_jpeg on the device, roi_align crops: the same crop boxes, other resampling, so it names the run)
    decode: Decode = Decode.cpu
    mean: Optional[list[float]] = None  # None = computed from the training set (in memory) or ImageNet's
    std: Optional[list[float]] = None


@dataclass
class LogConfig:
    every: int = 10  # iterations between per-iteration records
    tensorboard: bool = True
    progress: Progress = Progress.auto
    # gradient noise scale B_simple (McCandlish et al. 2018) as train/noise_scale every log.every iterations;
    # needs >= 2 forward passes per step (batch.workers_per_pass < k/W); read-only, no effect on the result
    noise_scale: bool = False


@dataclass
class CheckpointConfig:
    every_iters: int = 0  # extra checkpoints within an epoch; 0 = end of epoch only
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2"])  # checkpoint and exit 3
    # several processes agree on a signal every this many iterations (and at every scheduled checkpoint):
    # the preemption checkpoint is written within this many iterations of the signal; one process: every one
    preempt_check_every: int = 10
    # stop (after that epoch's checkpoint, exit 0, no summary) once this many epochs are done; 0 = never. A probe
    # of a run's first epochs: the same command without it continues the very same run (no effect on the result)
    stop_after_epoch: int = 0


@dataclass
class DistConfig:
    """Process group of a multi-process run (torchrun, srun). ``backend``, ``timeout_s`` and ``requeue``
    have no effect on the result (§4); a compressing ``comm_hook`` has (it is part of the run's identity)."""

    backend: Backend = no_effect(Backend.auto)  # auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    # a rank that waits this long for the others (one died or hangs) exits with status 4
    timeout_s: float = no_effect(600.0)
    # on SLURM, rank 0 runs `scontrol requeue $SLURM_JOB_ID` after a preemption checkpoint
    requeue: bool = no_effect(False)
    # DDP communication hook compressing the gradient allreduce: none (fp32) | fp16 | bf16 | powersgd.
    # A no-op on a single process (there is no allreduce) and not available with memory.fsdp.
    comm_hook: CommHook = CommHook.none
    powersgd_rank: int = 1  # powersgd: rank r of the low-rank approximation P Q^T of each matrix-shaped gradient
    powersgd_start_iter: int = 2  # powersgd: plain allreduce before this step (torch's >= 2; its default is 1000)


@dataclass
class OffloadConfig:
    """Seminar, "Reduce memory usage": CPU offloading (``sequential``) and model offloading (``model``).

    Evaluation takes all three modes; training only ``none`` (see :func:`validate`)."""

    # none | sequential (per submodule, accelerate.cpu_offload) | model (accelerate.cpu_offload_with_hook)
    mode: OffloadMode = OffloadMode.none


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
    log: LogConfig = no_effect(default_factory=LogConfig)
    checkpoint: CheckpointConfig = no_effect(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    offload: OffloadConfig = no_effect(default_factory=OffloadConfig)  # training takes only mode=none
    memory: MemoryConfig = no_effect(default_factory=MemoryConfig)
    seed: int = 0
    device: Device = no_effect(Device.auto)  # auto | cpu | cuda
    threads: int = no_effect(0)  # torch intra-op threads; 0 = torch's default
    # true: cuDNN's fixed algorithms (bit-exact resume and 1-vs-W); false: cudnn.benchmark autotunes and fp32
    # matmuls may use TF32. auto | true | false; auto: false on a CUDA device with bf16, true elsewhere
    deterministic: Any = "auto"
    # autocast precision of forward and loss: auto | fp32 | bf16 | fp16 (fp16 with a GradScaler; weights,
    # gradients, optimizer state and BN statistics stay fp32). auto: bf16 on a CUDA device that supports it,
    # fp32 elsewhere. Changes the result in the last bits, so it names the run (config.yaml: the resolved value).
    precision: Precision = Precision.auto
    # torch.compile of the model (nn.Module.compile: in place, checkpoints unchanged), before DDP/FSDP2 wrap it;
    # fused kernels sum in another order, so the result differs from eager in the last bits and the key names
    # the run (measured: not bit-equal on CPU). Ghost BN is traced too: one graph for the whole network.
    compile: bool = False
    # with compile=true: default | reduce_overhead (CUDA graphs; static shapes: equal forward passes, the
    # last validation batch padded) | max_autotune (kernel autotuning; long compiles). Picks other kernels, so
    # it names the run.
    compile_mode: CompileMode = CompileMode.default


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
    device: Device = Device.cpu  # cpu | cuda | auto (the integer kernels are CPU kernels)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    seed: int = 0  # which training images calibrate


@dataclass
class EvalOptions:
    bn_recompute: int = 0  # training minibatches (k*n each, BN over n) that recompute BN statistics; 0 = off
    batch: int = no_effect(0)  # images per forward pass; 0 = the checkpoint's batch.eval_batch
    precision: EvalPrecision = EvalPrecision.fp32  # conv/linear weights' dtype on the device (BN stays fp32)


@dataclass
class EvalDataConfig:
    """Where the checkpoint's data set lives now; None keeps the value stored in the checkpoint."""

    root: Optional[str] = None
    cache_dir: Optional[str] = no_effect(None)
    num_workers: Any = no_effect(None)  # "auto" or an int >= 0


@dataclass
class EvalConfig:
    """``lbsgd eval``: network and data set come from the checkpoint's stored config."""

    checkpoint: str = MISSING
    eval: EvalOptions = field(default_factory=EvalOptions)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    device: Device = no_effect(Device.auto)  # auto | cpu | cuda: the execution device
    threads: int = no_effect(0)  # torch intra-op threads; 0 = torch's default


SCHEMAS: dict[str, type] = {"train": TrainConfig, "quantize": QuantizeConfig, "eval": EvalConfig}


def register_configs() -> None:
    """Make the schemas available to the YAML tree as ``train_schema``, ``quantize_schema``, ``eval_schema``."""
    cs = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        cs.store(name=f"{command}_schema", node=schema)


# --------------------------------------------------------------------------- derived from the schema


def _leaves(schema: type, prefix: str = "", inherited: bool = False):
    """``(dotted key, type, changes the result)`` of every leaf key of a dataclass schema."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        no_result = inherited or f.metadata.get("result", True) is False
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, f"{prefix}{f.name}.", no_result)
        else:
            yield f"{prefix}{f.name}", kind, not no_result


def no_effect_keys(command: str = "train") -> list[str]:
    """The keys of ``command``'s schema that do not change the result (fields marked :data:`NO_EFFECT`).

    They are left out of run directory names (``hydra.job.config.override_dirname.exclude_keys``,
    set from this list by the ``${lbsgd_no_effect:<command>}`` resolver in conf/hydra/lbsgd.yaml) and
    ignored when ``lbsgd train`` resumes a run (:func:`lbsgd_cli.rundir.config_difference`)."""
    return [key for key, _, result in _leaves(SCHEMAS[command]) if not result]


def _is_float(kind: Any) -> bool:
    args = typing.get_args(kind)
    return kind is float or float in args or any(_is_float(a) for a in args)


def _check_finite(cfg: Any, command: str) -> None:
    """Every float key (and float list) holds a finite number: ``nan`` and ``inf`` are one-line errors."""
    for key, kind, _ in _leaves(SCHEMAS[command]):
        if not _is_float(kind):
            continue
        value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None
        values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                _fail(key, f"must be a finite number, got {v}")


# --------------------------------------------------------------------------- validation


def _fail(key: str, message: str) -> None:
    raise UserError(f"{key}: {message}")


def validate(cfg: DictConfig | Any) -> None:
    """Check what types cannot: finite floats, signs, ranges and consistency. Raises :class:`UserError`."""
    _check_finite(cfg, "train")
    b, o, s, m, d = cfg.batch, cfg.optim, cfg.schedule, cfg.model, cfg.data
    if m.arch not in BUILTIN_NETWORKS:  # the name first: the keys below depend on the network
        from .models import check_arch  # torchvision's list, imported only for a name that is not lbsgd's own

        check_arch(m.arch)
    check_data_root(d.name, d.root)
    positive = (("batch.k", b.k, "a positive number of workers"), ("batch.n", b.n, "a positive per-worker batch"),
                ("batch.eval_batch", b.eval_batch, "positive"), ("optim.base_lr", o.base_lr, "positive"),
                ("optim.ref_batch", o.ref_batch, "positive"), ("schedule.epochs", s.epochs, "positive"),
                ("log.every", cfg.log.every, "positive"),
                ("checkpoint.preempt_check_every", cfg.checkpoint.preempt_check_every, "positive"))
    for name in cfg.checkpoint.preempt_signals:  # before the run starts, not when it installs the handlers
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            _fail("checkpoint.preempt_signals", f"unknown signal {name!r}")
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
    mode = in_memory_mode(d.in_memory)
    if isinstance(cfg, DictConfig) and d.in_memory != mode:
        d.in_memory = mode  # one spelling in config.yaml and checkpoints: a resume compares like with like
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
    if cifar and d.in_memory == "false":
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
    _check_finite(cfg, "eval")
    if OmegaConf.is_missing(cfg, "checkpoint") or not str(cfg.checkpoint).strip():
        _fail("checkpoint", "give the checkpoint to evaluate: lbsgd eval checkpoint=PATH")
    if cfg.eval.bn_recompute < 0:
        _fail("eval.bn_recompute", f"must be >= 0 training minibatches (0 = off), got {cfg.eval.bn_recompute}")
    if cfg.eval.batch < 0:
        _fail("eval.batch", f"must be >= 0 (0 = the checkpoint's batch.eval_batch), got {cfg.eval.batch}")
    if cfg.data.num_workers is not None:
        check_num_workers(cfg.data.num_workers)


def in_memory_mode(value: Any) -> str:
    """``data.in_memory`` as ``"auto"``, ``"true"`` or ``"false"``: Hydra's bools (``data.in_memory=false``),
    any case of the words (``'False'``, ``AUTO``); anything else is a one-line error."""
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        _fail("data.in_memory", f"must be auto, true or false, got {value!r}")
    return mode


def check_num_workers(value: Any) -> None:
    """``data.num_workers``: "auto" or an integer >= 0 (a digit string from the command line counts)."""
    if value == "auto":
        return
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        _fail("data.num_workers", f'must be "auto" or an integer >= 0, got {value!r}')
    if int(value) < 0:
        _fail("data.num_workers", f"must be >= 0, got {value}")


def as_list(value: Any) -> list[Any]:
    """A config value that may be one value or a list, as a list."""
    return list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else [value]


# what a bool-typed key accepts as a word (OmegaConf's spellings), for the Any-typed keys that take bools too
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "y": True,
               "n": False, "1": True, "0": False}


def validate_quantize(cfg: DictConfig | Any) -> None:
    """``lbsgd quantize``: bits in 2..8, known granularity and method, a checkpoint file."""
    _check_finite(cfg, "quantize")
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
        values = [_BOOL_WORDS.get(v.lower(), v) if isinstance(v, str) else v for v in as_list(q[key])]
        if any(not isinstance(v, bool) for v in values):
            _fail(f"quant.{key}", f"must be true or false (or a list of them), got {q[key]!r}")
        if isinstance(cfg, DictConfig):
            q[key] = values if OmegaConf.is_list(q[key]) or isinstance(q[key], list) else values[0]
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
VALIDATORS: dict[str, Callable[[Any], None]] = {"train": validate, "quantize": validate_quantize,
                                                "eval": validate_eval}
