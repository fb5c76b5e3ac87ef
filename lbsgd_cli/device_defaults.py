"""``auto`` values of ``precision``, ``model.channels_last`` and ``deterministic``: fast on a GPU, exact on a CPU.

Not a rule of the paper: how the arithmetic runs on the device at hand. On a CUDA device that supports
bf16 (``torch.cuda.is_bf16_supported()``), ``auto`` is bf16 autocast, NHWC (channels_last) weights and
activations, and cuDNN autotuning (``deterministic=false``: ``cudnn.benchmark`` picks the fastest
convolution algorithms, and fp32 matmuls and convolutions may use TF32). Anywhere else it is the bit-exact
mode lbsgd always had: fp32, NCHW, ``deterministic=true``.

:func:`resolve_auto` is resolved once, before anything runs, from a :class:`DeviceCaps` (so tests pass a
made-up device); ``lbsgd train`` writes the resolved values into the run's config (``config.yaml`` and
every checkpoint), so the resume check (:func:`lbsgd_cli.rundir.config_difference`) sees the arithmetic
that was used: a run started on a CPU (``auto`` -> fp32) is not resumed in bf16 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AUTO = "auto"


@dataclass(frozen=True)
class DeviceCaps:
    """What ``auto`` looks at: the device type, whether it computes in bf16, and its name (for the header)."""

    type: str  # "cpu", "cuda", ...
    bf16: bool = False  # a CUDA device with bf16 support
    name: str = ""

    @classmethod
    def of(cls, device: torch.device) -> DeviceCaps:
        """The capabilities of ``device`` (queried only for a CUDA device)."""
        if device.type != "cuda":
            return cls(device.type)
        return cls("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class Resolved:
    """The concrete values, and one line saying what ``auto`` chose and why (empty if nothing was auto)."""

    precision: str
    channels_last: bool
    deterministic: bool
    chosen: tuple[str, ...]  # the keys that were auto
    note: str


def resolve_auto(precision: str, channels_last: bool | str, deterministic: bool | str, caps: DeviceCaps) -> Resolved:
    """Replace each ``auto`` by the device's fast value (CUDA with bf16) or the exact one (anything else)."""
    fast = caps.type == "cuda" and caps.bf16
    chosen = tuple(key for key, value in (("precision", precision), ("model.channels_last", channels_last),
                                          ("deterministic", deterministic)) if str(value) == AUTO)
    if str(precision) == AUTO:
        precision = "bf16" if fast else "fp32"
    if str(channels_last) == AUTO:
        channels_last = fast
    if str(deterministic) == AUTO:
        deterministic = not fast
    precision = str(precision)
    note = ""
    if chosen:
        values = {"precision": precision, "model.channels_last": str(bool(channels_last)).lower(),
                  "deterministic": str(bool(deterministic)).lower()}
        why = (f"a CUDA device with bf16 ({caps.name or 'cuda'}): the fast mode; deterministic=true "
               "precision=fp32 model.channels_last=false give the bit-exact one" if fast else
               f"{'a CUDA device without bf16' if caps.type == 'cuda' else 'device ' + caps.type}: the bit-exact mode")
        note = "auto: " + ", ".join(f"{k}={values[k]}" for k in chosen) + f" ({why})"
    return Resolved(precision, bool(channels_last), bool(deterministic), chosen, note)


def set_backend_flags(deterministic: bool, device: torch.device) -> None:
    """cuDNN and TF32 for ``deterministic``: fixed algorithms and full fp32 matmuls (bit-exact resume and
    1-vs-W), or autotuned algorithms with TF32 allowed in the fp32 parts. Only CUDA's flags are touched."""
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions, in both modes
        torch.set_float32_matmul_precision("highest" if deterministic else "high")
