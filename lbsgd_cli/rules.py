"""The paper's rules as pure functions (Goyal et al. 2017).

Where is warmup? Here: :func:`lr_at`. Every rule of the recipe that is a formula
lives in this module, with the section of the paper it comes from, and is pinned
by ``tests/test_rules.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .choices import Decay, LRRule, Warmup


def peak_lr(base_lr: float, k: int, n: int, ref_batch: int, rule: LRRule = LRRule.linear) -> float:
    """The rate after warmup for a minibatch of ``k*n``.

    §2.1, linear scaling rule: "when the minibatch size is multiplied by k,
    multiply the learning rate by k": ``base_lr * k*n / ref_batch`` (``0.1 * kn/256``
    for ResNet-50). Table 2a's alternatives: ``sqrt`` scales by the square root of the
    ratio, ``none`` keeps ``base_lr``.
    """
    ratio = k * n / ref_batch
    if rule == LRRule.linear:
        return base_lr * ratio
    if rule == LRRule.sqrt:
        return base_lr * math.sqrt(ratio)
    return base_lr


def iters_per_epoch(train_size: int, k: int, n: int) -> int:
    """Minibatches of ``k*n`` in one epoch; the last incomplete one is dropped (Remark 4)."""
    return train_size // (k * n)


def warmup_iters(warmup_epochs: float, iters_per_epoch_: int) -> int:
    """``T``: warmup length in iterations (§2.2: 5 epochs)."""
    return int(round(warmup_epochs * iters_per_epoch_))


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    peak: float,
    iters_per_epoch: int,
    warmup: Warmup,
    warmup_epochs: float,
    milestones: Sequence[int],
    gamma: float = 0.1,
    decay: Decay = Decay.step,
    total_iters: int = 0,
    power: float = 2.0,
) -> float:
    """Learning rate at ``iteration`` (counted from 0 over the whole run).

    §2.2 gradual warmup: for ``t < T`` the rate is ``start + (peak - start) * t / T``,
    a constant increment every iteration from ``start`` = ``base_lr`` (the rate of the
    reference minibatch) to ``peak`` after ``T = warmup_epochs * iters_per_epoch``
    iterations; the schedule proper starts at ``t = T``. When ``peak < base_lr``
    (a minibatch smaller than the reference) warmup starts at ``peak`` and so is flat:
    warming *down* is not what the paper does.
    Constant warmup (the §2.2 ablation): ``start`` for ``t < T``, then a jump to ``peak``.
    §5.1 schedule (``decay=step``): ``peak`` divided by ``1/gamma`` (10) at each milestone epoch.

    Beyond the paper, over the ``total_iters - T`` iterations after warmup, with ``p`` the fraction
    of them done: ``decay=poly`` is ``peak * (1 - p)**power`` (You et al. 2017, LARS: power 2) and
    ``decay=cosine`` is ``peak * (1 + cos(pi * p)) / 2`` (Loshchilov & Hutter 2017, without restarts).
    Both reach 0 at ``total_iters``; ``milestones`` and ``gamma`` apply to ``step`` alone.
    """
    start = min(base_lr, peak)
    t_warm = warmup_iters(warmup_epochs, iters_per_epoch) if warmup != Warmup.none else 0
    if iteration < t_warm:
        if warmup == Warmup.gradual:
            return start + (peak - start) * iteration / t_warm
        return start
    if decay == Decay.step:
        drops = sum(1 for m in milestones if iteration >= m * iters_per_epoch)
        return peak * gamma**drops
    if total_iters <= t_warm:
        raise ValueError(f"decay {decay}: total_iters {total_iters} must exceed the {t_warm} warmup iterations")
    progress = min(1.0, (iteration - t_warm) / (total_iters - t_warm))
    if decay == Decay.poly:
        return peak * (1.0 - progress) ** power
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_normaliser(k: int, n: int) -> int:
    """Remark 3: each worker's summed loss is divided by ``k*n``, not ``n``, since allreduce sums."""
    return k * n


def momentum_correction(lr_new: float, lr_old: float) -> float:
    """Remark 2, eq. (10): with ``v <- m*v + lr*g; w <- w - v``, scale ``v`` by ``lr_new/lr_old``
    when the rate changes, so that it matches PyTorch's ``v <- m*v + g; w <- w - lr*v``."""
    return lr_new / lr_old if lr_old != 0 else 1.0
