"""Structured config schema of ``lbsgd train``, ``quantize`` and ``eval``, and the one spelling of its values.

The dataclasses below are the *types* of the config tree; the YAML files in
``conf/`` only choose values. Hydra/OmegaConf reject unknown keys and values of
the wrong type (``batch.k=abc``, ``schedule.warmup=linear``) before anything
runs; :mod:`lbsgd_cli.validation` checks the rest (signs, ranges, consistency)
without changing anything. The few ``Any``-typed keys that take several spellings
(``data.in_memory``; ``quant.symmetric`` and ``quant.activations``, one value or a
list) are given one spelling by :func:`normalise_train` and :func:`normalise_quantize`,
called where a command prepares its config, after validation: config.yaml and the
checkpoints then hold one spelling, and a resume compares like with like.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .choices import (Allreduce, Backend, BNKernel, CommHook, CompileMode, DataName, Decay, Decode, Device,
                      EvalPrecision, Labels, LRRule, MomentumForm, OffloadMode, Optimizer, Precision, Progress,
                      Shortcut, Stem, Warmup)
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
    # cifar10 / cifar100 (torchvision's pickled batches, lbsgd_cli/data/cifar.py): fetch them into data.root through
    # torchvision when they are not there; the files are the same md5-checked ones, so no effect on the result
    download: bool = no_effect(False)
    # cifar10 / cifar100: check each batch file's md5 against torchvision's list; a mismatch is an error.
    # false reads the files unchecked (and says so in one warning line): a checked file gives the same result
    verify: bool = no_effect(True)
    labels: Labels = Labels.fine  # cifar100: its 100 fine classes or its 20 coarse superclasses
    # auto | true | false. Any, not str or an Enum: Hydra hands `data.in_memory=true` over as a bool (a str
    # field would make it 'True'); normalise_train() turns every spelling into "auto", "true" or "false"
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
    # and as data/bad_files in metrics.jsonl (lbsgd_cli/data/bad_data.py). Names the run: the samples may differ
    skip_bad: bool = False
    # streaming loaders only: DataLoader worker processes, or "auto" = the CPUs this process may use (its
    # affinity, or SLURM's CPUs per task shared by the ranks of one task) less one for training
    # (lbsgd_cli.data.streaming.resolve_num_workers). Any, not int, so that "auto" and 8 both parse
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
    # joining the process group waits max(timeout_s, this) for every rank: ranks of one job may start minutes
    # apart (imports from a busy shared file system); one that cannot reach the master fails after it
    rendezvous_timeout_s: float = no_effect(300.0)
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

    Evaluation takes all three modes; training only ``none`` (see :func:`lbsgd_cli.validation.validate`)."""

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


@dataclass
class PlanOptions:
    """``lbsgd plan``'s inputs (lbsgd_cli/plan.py; the model and its sources: results/plan.md)."""

    gpus: int = 256  # the GPU count to plan for; the table runs 8, 16, ... up to it
    gpus_per_node: int = 8
    n: int = 32  # images per GPU per step (batch.n); plan.run_dir sets it from the run
    # the GPU's images/s at n per GPU, first of: images_per_s (a number) | gpu_bench (scripts/bench/bench_gpu.py's JSON,
    # its fastest step row or gpu_bench_row) | gpu (a row of lbsgd_cli.plan.GPU_TABLE, each with its source)
    images_per_s: Optional[float] = None
    gpu_bench: Optional[str] = None
    gpu_bench_row: Optional[str] = None
    gpu: str = "P100"
    run_dir: Optional[str] = None  # a run directory of lbsgd train: its model, batch.n and schedule.epochs
    num_classes: int = 1000
    intra_gbit: float = 160.0  # GPU-to-GPU link within a node, Gbit/s per direction
    intra_latency_us: float = 5.0  # assumed (not from a source): see lbsgd_cli.plan
    inter_gbit: float = 50.0  # a node's network link, Gbit/s per direction (Goyal et al.: 50 Gbit Ethernet)
    inter_latency_us: float = 10.0  # assumed (not from a source)
    algorithm: Allreduce = Allreduce.hierarchical  # ring | halving_doubling | hierarchical (Goyal et al. §4.1)
    comm_hook: CommHook = CommHook.none  # the allreduce's precision: none (fp32) | fp16 | bf16 | powersgd
    powersgd_rank: int = 1
    bucket_mb: float = 25.0  # DDP's bucket_cap_mb; 0 = one buffer of all gradients
    first_bucket_mb: float = 1.0  # DDP's first bucket
    overlap: bool = True  # allreduce buckets while backward runs (DDP, Goyal et al. §4)
    backward_fraction: float = 0.6667  # share of a step's compute that is the backward pass
    loader_cores_per_node: float = 0.0  # CPU cores decoding per node; 0 = the loader is not modelled
    decode_ms_per_image: float = 0.0  # CPU ms to decode and augment one image (scripts/bench/bench_gpu.py --per-core-only)
    epochs: float = 90.0
    dataset_size: int = 1281167  # ImageNet-1k's training images
    noise_run: Optional[str] = None  # a run of lbsgd train log.noise_scale=true: is each kn past its edge?


@dataclass
class PlanConfig:
    """``lbsgd plan``: the network comes from ``model`` (or ``plan.run_dir``); nothing is trained."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet50"))


SCHEMAS: dict[str, type] = {"train": TrainConfig, "quantize": QuantizeConfig, "eval": EvalConfig,
                            "plan": PlanConfig}


def register_configs() -> None:
    """Make the schemas available to the YAML tree as ``train_schema``, ``quantize_schema``, ``eval_schema``,
    ``plan_schema``."""
    cs = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        cs.store(name=f"{command}_schema", node=schema)




# --------------------------------------------------------------------------- derived from the schema


def leaves(schema: type, prefix: str = "", inherited: bool = False):
    """``(dotted key, type, changes the result)`` of every leaf key of a dataclass schema."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        no_result = inherited or f.metadata.get("result", True) is False
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaves(kind, f"{prefix}{f.name}.", no_result)
        else:
            yield f"{prefix}{f.name}", kind, not no_result


def no_effect_keys(command: str = "train") -> list[str]:
    """The keys of ``command``'s schema that do not change the result (fields marked :data:`NO_EFFECT`).

    They are left out of run directory names (``hydra.job.config.override_dirname.exclude_keys``,
    set from this list by the ``${lbsgd_no_effect:<command>}`` resolver in conf/hydra/lbsgd.yaml) and
    ignored when ``lbsgd train`` resumes a run (:func:`lbsgd_cli.rundir.config_difference`)."""
    return [key for key, _, result in leaves(SCHEMAS[command]) if not result]


def is_float_type(kind: Any) -> bool:
    """Whether a schema type holds floats (``float``, ``Optional[float]``, ``list[float]``)."""
    args = typing.get_args(kind)
    return kind is float or float in args or any(is_float_type(a) for a in args)


# --------------------------------------------------------------------------- one spelling per value


def in_memory_mode(value: Any) -> str:
    """``data.in_memory`` as ``"auto"``, ``"true"`` or ``"false"``: Hydra's bools (``data.in_memory=false``),
    any case of the words (``'False'``, ``AUTO``); anything else is a one-line error."""
    mode = str(value).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise UserError(f"data.in_memory: must be auto, true or false, got {value!r}")
    return mode


def as_list(value: Any) -> list[Any]:
    """A config value that may be one value or a list, as a list."""
    return list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else [value]


# what a bool-typed key accepts as a word (OmegaConf's spellings), for the Any-typed keys that take bools too
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "y": True,
               "n": False, "1": True, "0": False}


def bool_words(value: Any) -> list[Any]:
    """A one-value-or-list key's values with the words a bool key takes (:data:`BOOL_WORDS`) as bools; any
    other value is left as it is (the validation names it)."""
    return [BOOL_WORDS.get(v.lower(), v) if isinstance(v, str) else v for v in as_list(value)]


def normalise_train(cfg: DictConfig | Any) -> None:
    """Give ``lbsgd train``'s config one spelling per value, in place, after validation: ``data.in_memory``
    as ``"auto"``, ``"true"`` or ``"false"`` (Hydra hands ``data.in_memory=false`` over as a bool). config.yaml and
    the checkpoints then hold that spelling, so a resume compares like with like."""
    mode = in_memory_mode(cfg.data.in_memory)
    if isinstance(cfg, DictConfig) and cfg.data.in_memory != mode:
        cfg.data.in_memory = mode


def normalise_quantize(cfg: DictConfig | Any) -> None:
    """Give ``lbsgd quantize``'s config one spelling per value, in place, after validation:
    ``quant.symmetric`` and ``quant.activations`` as bools (one, or a list where a list was given)."""
    if not isinstance(cfg, DictConfig):
        return
    q = cfg.quant
    for key in ("symmetric", "activations"):
        values = bool_words(q[key])
        q[key] = values if OmegaConf.is_list(q[key]) or isinstance(q[key], list) else values[0]
