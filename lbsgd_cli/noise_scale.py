"""Gradient noise scale ``B_simple = tr(Sigma)/|G|^2`` (McCandlish et al. 2018), measured while training.

McCandlish et al. §2.2 and Appendix A: the expected squared norm of a minibatch gradient of
size ``B`` is ``|G|^2 + tr(Sigma)/B`` (``G`` the true gradient, ``Sigma`` the per-sample
gradient covariance). Two batch sizes ``B_small < B_big`` give unbiased estimates of both terms
(:func:`g2_estimate`, :func:`trace_estimate`); their ratio is biased and noisy, so each is
smoothed by an exponential moving average over iterations *before* dividing (Appendix A.1).
``B_simple`` is the minibatch at which a step makes half the progress of a full-batch step: well
below it larger minibatches scale perfectly (Goyal et al.'s linear regime), well above it they
bring almost nothing.

In training (:class:`NoiseScaleProbe`) the two sizes come for free: ``B_small`` is the first
forward pass of a step (``workers_per_pass * n`` samples, read before any allreduce) and
``B_big = k*n`` the whole step's averaged gradient, read just before ``optimizer.step()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def g2_estimate(g2_small: Any, g2_big: Any, b_small: float, b_big: float) -> Any:
    """Unbiased ``|G|^2`` from the squared norms of two minibatch gradients (McCandlish et al. App. A.1)."""
    return (b_big * g2_big - b_small * g2_small) / (b_big - b_small)


def trace_estimate(g2_small: Any, g2_big: Any, b_small: float, b_big: float) -> Any:
    """Unbiased ``tr(Sigma)`` (per-sample covariance) from the same two norms (App. A.1)."""
    return (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)


def b_simple(trace: float, g2: float) -> float:
    """``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. §2.2); ``inf`` when ``|G|^2 <= 0`` (pure noise)."""
    return trace / g2 if g2 > 0 else float("inf")


class EMA:
    """Bias-corrected exponential moving average (as Adam's): the mean of one sample is that sample.

    Works on floats and on tensors (values kept on the device: no synchronisation per update)."""

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.raw, self.count = decay, 0.0, 0

    def update(self, value: Any) -> None:
        self.raw = self.decay * self.raw + (1 - self.decay) * value
        self.count += 1

    @property
    def value(self) -> Any:
        return self.raw / (1 - self.decay**self.count) if self.count else float("nan")


class NoiseScaleEstimator:
    """EMAs of the ``|G|^2`` and ``tr(Sigma)`` estimates of successive iterations (Appendix A.1)."""

    def __init__(self, b_small: float, b_big: float, decay: float = 0.95) -> None:
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < B_small < B_big, got {b_small}, {b_big}")
        self.b_small, self.b_big = b_small, b_big
        self.g2, self.trace = EMA(decay), EMA(decay)

    def update(self, g2_small: Any, g2_big: Any) -> None:
        """Add one iteration: squared norms of the mean gradients over ``B_small`` and ``B_big`` samples."""
        self.g2.update(g2_estimate(g2_small, g2_big, self.b_small, self.b_big))
        self.trace.update(trace_estimate(g2_small, g2_big, self.b_small, self.b_big))

    def result(self, mean=lambda values: values) -> dict[str, float]:
        """``train/noise_scale`` (``B_simple``), ``train/noise_scale_trS`` and ``train/noise_scale_G2``.

        ``mean`` averages ``[g2, trace]`` over processes (each process has its own ``B_small``
        gradient); averaging the EMAs equals the EMA of the averages, as both are linear."""
        g2, trace = (float(v) for v in mean([float(self.g2.value), float(self.trace.value)]))
        b = b_simple(trace, g2)  # JSON has no inf: null while the |G|^2 estimate is not positive
        return {"train/noise_scale": b if math.isfinite(b) else None, "train/noise_scale_trS": trace,
                "train/noise_scale_G2": g2}


def _squared_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()


class NoiseScaleProbe:
    """Feeds a :class:`NoiseScaleEstimator` from an unchanged training step, through two hooks.

    * a forward pre-hook on the model: at the *second* training forward of a step, ``.grad`` holds
      the first pass's gradient alone (``zero_grad(set_to_none)`` ran before the first pass, and
      DDP's ``no_sync`` keeps it local): its squared norm, rescaled to a mean, is ``|G_small|^2``;
    * an optimizer step pre-hook: ``.grad`` is then the step's mean over ``k*n``: ``|G_big|^2``.

    ``grad_scale`` turns the accumulated first-pass ``.grad`` into the mean over its ``b_small``
    samples (the loop divides summed losses by ``k*n/W``, Remark 3). Needs >= 2 passes per step.
    Read-only: gradients and the update are untouched.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, b_small: int, b_big: int,
                 grad_scale: float, decay: float = 0.95) -> None:
        self.estimator = NoiseScaleEstimator(b_small, b_big, decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_scale = grad_scale
        self._forwards, self._small = 0, None
        self._handles = [model.register_forward_pre_hook(self._before_forward),
                         optimizer.register_step_pre_hook(self._before_step)]

    def _before_forward(self, module: nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation
        self._forwards += 1
        if self._forwards == 2:
            self._small = _squared_norm(self.params) * self.grad_scale**2

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._small is not None:
            with torch.no_grad():
                self.estimator.update(self._small, _squared_norm(self.params))
        self._forwards, self._small = 0, None

    def result(self, mean=lambda values: values) -> dict[str, float]:
        return self.estimator.result(mean)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
