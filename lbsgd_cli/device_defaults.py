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

import time
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU flags (/proc/cpuinfo) of bf16 arithmetic in hardware: x86's AVX-512 BF16 and AMX, Arm's BF16 extension
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

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


def cpu_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 in hardware (``avx512_bf16``/``amx_bf16`` on x86, ``bf16`` on Arm), from
    /proc/cpuinfo's flags; None where there is no /proc/cpuinfo to read. Without them oneDNN emulates bf16,
    and a bf16 step is about 10x slower than fp32 (an AVX2-only AMD EPYC: a conv-BN-ReLU-conv block's forward
    and backward 388-421 ms in bf16 against 29-46 ms in fp32)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS) if flags else None


def bf16_cpu_slowdown(repeats: int = 2) -> tuple[float, float]:
    """Seconds of one forward and backward of a conv-BN-ReLU-conv block (64 channels, 32 images of 32x32) in fp32
    and in bf16 autocast on this CPU, the faster of ``repeats`` each after one untimed: the header's measured
    factor when bf16 is not native (about 1 s on such a CPU)."""
    block = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64),
                                torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1, bias=False))
    x = torch.randn(32, 64, 32, 32)
    times = {}
    for name in ("fp32", "bf16"):
        best = float("inf")
        for i in range(repeats + 1):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                block(x).float().sum().backward()
            if i:
                best = min(best, time.perf_counter() - t)
        times[name] = best
    return times["fp32"], times["bf16"]


def bf16_cpu_warning(fp32_s: float, bf16_s: float) -> str:
    return (f"warning: precision=bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag): a conv-BN-ReLU-"
            f"conv block takes {bf16_s * 1e3:.0f} ms against {fp32_s * 1e3:.0f} ms in fp32, measured now "
            f"({bf16_s / fp32_s:.1f}x); precision=fp32 is the way out (scale=cpu pins bf16: the study's CPU has it)")


def resolve_auto(precision: str, channels_last: bool | str, deterministic: bool | str, caps: DeviceCaps) -> Resolved:
    """Replace each ``auto`` by the device's fast value (CUDA with bf16) or the exact one (anything else)."""
    fast = caps.type == "cuda" and caps.bf16  # a CPU never gets bf16 from auto, native or not
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
