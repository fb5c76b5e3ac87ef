"""b-bit affine quantization of a trained network (seminar, "Reduce memory usage. Quantization").

A float ``x`` in ``[a, b]`` maps to a b-bit integer ``x_q`` in ``[a_q, b_q]``::

    x_q = clip(round(x / s + z), a_q, b_q)          (quantize)
    x   = s (x_q - z)                               (dequantize)
    s   = (b - a) / (b_q - a_q),   z = round((b a_q - a b_q) / (b - a))

with ``s > 0`` a float and ``z`` an integer. Integers live in signed ``torch.int8``
containers: ``[a_q, b_q] = [-2^(bits-1), 2^(bits-1) - 1]`` (asymmetric), or the
narrow ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` with ``a = -b = -max|x|`` (symmetric,
where the formula gives ``z = 0``). Every range contains 0, so 0 is exact.

Weights of every conv and linear layer are quantized per tensor or per output channel
(one ``(s, z)`` per row of the weight); biases and BN stay fp32 (the int32 / fp32 parts
of an integer deployment). Ranges ``[a, b]`` come from the min and max (``minmax``), from
percentiles (``percentile``), or from a grid search over clipped ranges minimising the
quantization MSE (``mse``). Activations, optionally, are fake-quantized per tensor at
the input of every conv and linear layer with ranges calibrated on training batches.

The maths only: torch and the one-line :class:`~lbsgd_cli.errors.UserError`, nothing of the config or the
networks. The integer checkpoint these tensors are stored in is :mod:`lbsgd_cli.quantized_checkpoint`;
``lbsgd quantize`` (:mod:`lbsgd_cli.quantize_run`) runs the table of settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UserError

METHODS = ("minmax", "mse", "percentile")
GRANULARITIES = ("per_tensor", "per_channel")


# --------------------------------------------------------------------------- the seminar's formulas


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``[a_q, b_q]`` of a signed b-bit integer; symmetric uses the narrow range (``-a_q = b_q``)."""
    if not 2 <= bits <= 8:
        raise UserError(f"quant.bits: must be between 2 and 8, got {bits}")
    hi = 2 ** (bits - 1) - 1
    return (-hi if symmetric else -hi - 1), hi


def qparams(
    lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` (float32) and integer zero point ``z`` (int32) of the range ``[lo, hi]``.

    ``s = (b - a)/(b_q - a_q)`` and ``z = round((b a_q - a b_q)/(b - a))`` (seminar), after
    widening ``[a, b]`` to contain 0 and, if symmetric, to ``[-max|x|, max|x|]``. Works
    elementwise on tensors of ranges (one per channel).
    """
    a_q, b_q = int_range(bits, symmetric)
    a = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0.0)
    b = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0.0)
    if symmetric:
        b = torch.maximum(-a, b)
        a = -b
    width = (b - a).clamp(min=1e-12)  # an all-zero tensor: any scale represents it exactly
    s = width / (b_q - a_q)
    z = torch.round((b * a_q - a * b_q) / width)
    return s.to(torch.float32), z.to(torch.int32)


def _view(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Broadcast per-channel parameters along ``axis`` of ``like`` (per tensor: unchanged)."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.view(shape)


def quantize(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, a_q: int, b_q: int, axis: int | None = None
) -> torch.Tensor:
    """``x_q = clip(round(x/s + z), a_q, b_q)`` as ``torch.int8``."""
    s, z = _view(s, x, axis), _view(z, x, axis)
    return torch.clamp(torch.round(x / s + z), a_q, b_q).to(torch.int8)


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``x = s (x_q - z)``."""
    s, z = _view(s, q, axis), _view(z, q, axis)
    return s * (q.to(torch.float32) - z.to(torch.float32))


def fake_quantize(x: torch.Tensor, s, z, a_q: int, b_q: int, axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize: the float values an integer kernel would compute with."""
    s, z = torch.as_tensor(s, device=x.device), torch.as_tensor(z, device=x.device)
    return dequantize(quantize(x, s, z, a_q, b_q, axis), s, z, axis).to(x.dtype)


# --------------------------------------------------------------------------- range setting


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The values that share one ``(s, z)``: one row per output channel, or one row in all."""
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def minmax_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.amin(1), rows.amax(1)


def percentile_range(rows: torch.Tensor, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P_(100-pct), P_pct]`` of each row: outliers beyond them are clipped."""
    q = torch.tensor([1 - pct / 100, pct / 100], dtype=rows.dtype)
    if rows.shape[1] > 2**24:  # torch.quantile's size limit: a strided sample of the row
        rows = rows[:, :: rows.shape[1] // 2**23 + 1]
    lo, hi = torch.quantile(rows, q, dim=1)
    return lo, hi


def mse_range(
    rows: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, min_frac: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``[min, max]`` to ``alpha [min, max]`` with the ``alpha`` in ``[min_frac, 1]`` (``grid``
    points) that minimises each row's quantization MSE ``mean (x - s(x_q - z))^2``."""
    a_q, b_q = int_range(bits, symmetric)
    lo, hi = minmax_range(rows)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for alpha in torch.linspace(1.0, min_frac, grid).tolist():
        s, z = qparams(alpha * lo, alpha * hi, bits, symmetric)
        err = (fake_quantize(rows, s, z, a_q, b_q, axis=0) - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, alpha * lo, best_lo)
        best_hi = torch.where(better, alpha * hi, best_hi)
    return best_lo, best_hi


def choose_range(
    x: torch.Tensor, per_channel: bool, method: str, bits: int, symmetric: bool, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[a, b]`` per row of ``x`` by ``method`` (minmax | mse | percentile)."""
    rows = _rows(x.detach().float(), per_channel)
    if method == "minmax":
        lo, hi = minmax_range(rows)
    elif method == "percentile":
        lo, hi = percentile_range(rows, percentile)
    elif method == "mse":
        lo, hi = mse_range(rows, bits, symmetric)
    else:
        raise UserError(f"quant.method: unknown range method {method!r} ({', '.join(METHODS)})")
    return (lo, hi) if per_channel else (lo[0], hi[0])


# --------------------------------------------------------------------------- packing (bits <= 4)


def values_per_byte(bits: int) -> int:
    """Sub-byte packing: four 2-bit, or two 3- or 4-bit values per byte; one value above 4 bits."""
    return 4 if bits == 2 else 2 if bits <= 4 else 1


def pack(q: torch.Tensor, a_q: int, bits: int) -> torch.Tensor:
    """Pack integers of ``bits`` bits into bytes as ``q - a_q >= 0``, lowest field first (int8 container)."""
    per = values_per_byte(bits)
    u = (q.reshape(-1).to(torch.int16) - a_q).to(torch.uint8)
    if per == 1:
        return q.reshape(-1).to(torch.int8)
    u = torch.cat([u, u.new_zeros(-u.numel() % per)]).view(-1, per)
    width = 8 // per
    out = torch.zeros(u.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= u[:, i] << (i * width)
    return out.view(torch.int8)


def unpack(packed: torch.Tensor, a_q: int, bits: int, numel: int) -> torch.Tensor:
    per = values_per_byte(bits)
    if per == 1:
        return packed.reshape(-1)[:numel].to(torch.int8)
    width, u = 8 // per, packed.view(torch.uint8)
    fields = torch.stack([(u >> (i * width)) & ((1 << width) - 1) for i in range(per)], dim=1).reshape(-1)
    return (fields[:numel].to(torch.int16) + a_q).to(torch.int8)


# --------------------------------------------------------------------------- quantized tensors


@dataclass
class QTensor:
    """A quantized weight: int8 storage (packed if ``packed``), ``scale``/``zero_point`` per row or one."""

    data: torch.Tensor  # torch.int8
    scale: torch.Tensor  # float32, () or (C_out,)
    zero_point: torch.Tensor  # int32, same shape as scale
    shape: tuple[int, ...]
    bits: int
    symmetric: bool
    packed: bool  # several values per byte (bits <= 4)

    @property
    def axis(self) -> int | None:
        return 0 if self.scale.dim() == 1 else None

    def int_values(self) -> torch.Tensor:
        a_q, _ = int_range(self.bits, self.symmetric)
        flat = unpack(self.data, a_q, self.bits, _numel(self.shape)) if self.packed else self.data.reshape(-1)
        return flat.reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.int_values(), self.scale, self.zero_point, self.axis)

    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scale.numel() + 4 * self.zero_point.numel()

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "scale": self.scale, "zero_point": self.zero_point, "shape": list(self.shape),
                "bits": self.bits, "symmetric": self.symmetric, "packed": self.packed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QTensor:
        return cls(d["data"], d["scale"], d["zero_point"], tuple(d["shape"]), d["bits"], d["symmetric"], d["packed"])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def quantize_tensor(
    w: torch.Tensor, bits: int, per_channel: bool, symmetric: bool, method: str, percentile: float = 99.99
) -> QTensor:
    """Quantize a weight with ``(s, z)`` per output channel (row ``w[c]``) or per tensor."""
    lo, hi = choose_range(w, per_channel, method, bits, symmetric, percentile)
    s, z = qparams(lo, hi, bits, symmetric)
    a_q, b_q = int_range(bits, symmetric)
    axis = 0 if per_channel else None
    q = quantize(w.detach().float().cpu(), s, z, a_q, b_q, axis)
    packed = bits <= 4
    data = pack(q, a_q, bits) if packed else q
    return QTensor(data, s, z, tuple(w.shape), bits, symmetric, packed)


# --------------------------------------------------------------------------- networks


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer, by module name: the layers whose weights become integers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def quantize_weights(
    model: nn.Module, bits: int, per_channel: bool, symmetric: bool, method: str, percentile: float = 99.99
) -> dict[str, QTensor]:
    """Quantize the weight of every conv/linear layer; returns ``{"<layer>.weight": QTensor}``."""
    return {
        f"{name}.weight": quantize_tensor(m.weight, bits, per_channel, symmetric, method, percentile)
        for name, m in quantizable_layers(model).items()
    }


@torch.no_grad()
def load_dequantized(model: nn.Module, qweights: dict[str, QTensor]) -> nn.Module:
    """Write ``s (x_q - z)`` into the float model's weights (simulated integer inference)."""
    params = dict(model.named_parameters())
    for key, qt in qweights.items():
        params[key].copy_(qt.dequantize().to(params[key].device, params[key].dtype))
    return model


class ActivationObserver:
    """Collects a conv/linear input's values over calibration batches: exact min and max,
    and a strided sample (up to ``keep`` values per batch) for the percentile and MSE ranges."""

    def __init__(self, keep: int = 20000) -> None:
        self.keep, self.lo, self.hi, self.samples = keep, float("inf"), float("-inf"), []

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.samples.append(x[:: max(1, x.numel() // self.keep)].cpu())

    def range(self, method: str, bits: int, percentile: float) -> tuple[float, float]:
        if method == "minmax":
            return self.lo, self.hi
        lo, hi = choose_range(torch.cat(self.samples), False, method, bits, False, percentile)
        return float(lo), float(hi)


class ActivationFakeQuant:
    """Forward pre-hook: the layer sees its input as b-bit integers ``s (x_q - z)`` (per tensor)."""

    def __init__(self, scale: float, zero_point: int, bits: int) -> None:
        self.scale, self.zero_point, self.bits = scale, zero_point, bits
        self.a_q, self.b_q = int_range(bits, False)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        return (fake_quantize(x, self.scale, self.zero_point, self.a_q, self.b_q), *inputs[1:])

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits}


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, batches: Iterable[torch.Tensor], bits: int, method: str, percentile: float = 99.99
) -> dict[str, dict[str, Any]]:
    """Observe every conv/linear input on ``batches`` (eval mode); asymmetric per-tensor ``(s, z)``
    per layer, so that ReLU outputs use all ``2^bits`` levels."""
    observers = {name: ActivationObserver() for name in quantizable_layers(model)}
    layers = quantizable_layers(model)
    handles = [layers[name].register_forward_pre_hook(obs) for name, obs in observers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, obs in observers.items():
        s, z = qparams(*obs.range(method, bits, percentile), bits, False)
        out[name] = {"scale": float(s), "zero_point": int(z), "bits": bits}
    return out


def attach_activation_quant(model: nn.Module, acts: dict[str, dict[str, Any]]) -> nn.Module:
    layers = quantizable_layers(model)
    for name, p in acts.items():
        layers[name].register_forward_pre_hook(ActivationFakeQuant(p["scale"], p["zero_point"], p["bits"]))
    return model
