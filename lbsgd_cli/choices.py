"""Every choice key's values as an Enum: no Hydra, no OmegaConf, no torch.

The config schema (:mod:`lbsgd_cli.config`) types its choice keys with these, so an unknown value is
rejected when the config is composed; the pure modules (:mod:`lbsgd_cli.rules`, :mod:`lbsgd_cli.optim`)
import them from here and stay free of the config layer. Each member's value is its name and members
compare equal to that string (``Warmup.none == "none"``), so they read as plain strings in YAML,
checkpoints and messages.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A choice key's value: a string that is also an Enum member."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Warmup(Choice):
    """Warmup modes of §2.2: ``gradual`` (the paper's), ``constant`` (ablation) and ``none``."""

    gradual = "gradual"
    constant = "constant"
    none = "none"


class Decode(Choice):
    """Where the streaming loader decodes images: ``cpu`` (the loader workers: libjpeg-turbo, PIL's pixels,
    PIL for CMYK and non-JPEG files, reduced-size JPEG decoding) or ``gpu`` (the workers send the files' bytes
    and crop boxes; ``torchvision.io.decode_jpeg`` on the run's device, crops by ``torchvision.ops.roi_align``)."""

    cpu = "cpu"
    gpu = "gpu"


class Decay(Choice):
    """The schedule after warmup: the paper's ``step`` drops (§5.1), or, beyond the paper, ``poly``
    (You et al. 2017, LARS: ``(1 - progress)**power``) and ``cosine`` (Loshchilov & Hutter 2017)."""

    step = "step"
    poly = "poly"
    cosine = "cosine"


class LRRule(Choice):
    """How the peak rate follows ``k*n`` (§2.1, Table 2a)."""

    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class MomentumForm(Choice):
    """Update form of Remark 2: PyTorch's ``v=m*v+g; w-=lr*v`` or the paper's eq. (10)."""

    pytorch = "pytorch"
    paper = "paper"


class Optimizer(Choice):
    """``sgd`` (§5.1) or ``lars`` (You et al. 2017, beyond the paper); chosen by the ``optim`` group."""

    sgd = "sgd"
    lars = "lars"


class DataName(Choice):
    """``digits`` (scikit-learn's bundled scans), ``imagefolder`` (``train/<class>/*`` trees of image files),
    ``cifar10`` / ``cifar100`` (torchvision's pickled batches, :mod:`lbsgd_cli.data.cifar`)."""

    digits = "digits"
    imagefolder = "imagefolder"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


# The data sets that read ``data.root`` (the folder they live in); the embedded digits have none.
ROOTED_DATA = (DataName.imagefolder, DataName.cifar10, DataName.cifar100)


class Labels(Choice):
    """CIFAR-100's labels: its 100 ``fine`` classes or its 20 ``coarse`` superclasses."""

    fine = "fine"
    coarse = "coarse"


class Stem(Choice):
    """The first layers of a torchvision ResNet: ``imagenet`` (7x7/2 conv and 3x3/2 max pool, as built)
    or ``cifar`` (one 3x3/1 conv, no pool: the usual ResNet-18 for 32x32 images)."""

    imagenet = "imagenet"
    cifar = "cifar"


class Shortcut(Choice):
    """The shortcut of a CIFAR ResNet block that changes shape (He et al. 2016, §3.3): ``A`` subsamples and
    zero-pads the new channels (parameter-free, the CIFAR networks' own); ``B`` is a projection, a strided 1x1
    conv and its own BN, as ResNet-50's (zero-gamma leaves that BN at gamma = 1)."""

    A = "A"
    B = "B"


# ``model.arch``'s own networks (lbsgd_cli/models.py); any other name is one of torchvision's classifiers.
BUILTIN_NETWORKS = ("small_cnn", "cifar_resnet")


class Progress(Choice):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    none = "none"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Backend(Choice):
    """``dist.backend``: ``auto`` is NCCL on GPUs and gloo on the CPU."""

    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class CommHook(Choice):
    """DDP communication hooks compressing the gradient allreduce (beyond the paper)."""

    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"
    powersgd = "powersgd"


class Allreduce(Choice):
    """Allreduce algorithms ``lbsgd plan`` models (lbsgd_cli/plan.py): ``ring`` (bucket algorithm, Barnett et al.
    1994; NCCL's and gloo's default), ``halving_doubling`` (recursive halving and doubling, Thakur et al. 2005) and
    ``hierarchical`` (Goyal et al. §4.1: reduce within a server, halving/doubling across servers, broadcast)."""

    ring = "ring"
    halving_doubling = "halving_doubling"
    hierarchical = "hierarchical"


class BNKernel(Choice):
    """How training-mode BN is computed (``lbsgd_cli.ghost_bn``): ``native`` (PyTorch's batch-norm kernel,
    one call per worker's slice) or ``fused`` (one torch.compile-generated kernel for all the pass's
    workers: C++ on CPUs, Triton on GPUs)."""

    native = "native"
    fused = "fused"


class Precision(Choice):
    """Autocast of forward and loss in training (fp16 with a gradient scaler); evaluation is always fp32.
    ``auto``: bf16 on a CUDA device that supports it, fp32 elsewhere (:mod:`lbsgd_cli.device_defaults`)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class EvalPrecision(Choice):
    """``lbsgd eval``'s ``eval.precision``: the dtype the network's conv and linear weights are held and run in
    on the execution device. BN parameters and statistics stay fp32, as under training's autocast. bf16 and
    fp16 halve the weights' device memory and what ``offload.mode`` copies host -> device."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class CompileMode(Choice):
    """``compile_mode``: torch.compile's mode for ``compile=true``. ``reduce_overhead`` records CUDA graphs
    (shapes are static: equal forward passes, validation padded to ``batch.eval_batch``); ``max_autotune``
    also benchmarks kernel choices (long compiles). :attr:`torch_mode` is torch's spelling."""

    default = "default"
    reduce_overhead = "reduce_overhead"
    max_autotune = "max_autotune"

    @property
    def torch_mode(self) -> str:
        return self.value.replace("_", "-")


class OffloadMode(Choice):
    """Seminar, "Reduce memory usage": CPU offloading (``sequential``) and model offloading (``model``)."""

    none = "none"
    sequential = "sequential"
    model = "model"


class Granularity(Choice):
    per_channel = "per_channel"
    per_tensor = "per_tensor"


class RangeMethod(Choice):
    minmax = "minmax"
    mse = "mse"
    percentile = "percentile"
