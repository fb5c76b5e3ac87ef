"""Remark 4 (§3) as plans: which samples each iteration takes, and the seeds of their augmentation.

One random permutation of the training set per epoch (:func:`epoch_permutation`), cut into minibatches of
``k*n``, each divided among the ``k`` workers ``n`` at a time (:func:`process_slice`: this process's
``k/W`` workers); the last incomplete minibatch is dropped. The permutation and every augmentation draw
depend only on ``(seed, epoch, iteration, position)`` (:func:`mix_seed`), never on the number of processes,
so the same experiment on 1 or W processes sees the same samples, augmented the same way.

A :class:`BatchPlan` is one iteration's share; a data source (:mod:`lbsgd_cli.data.in_memory`,
:mod:`lbsgd_cli.data.streaming`) turns plans into batches. This module imports no other module of the
package: sources build on it, never the reverse.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (same on every process and platform)."""
    h = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def epoch_permutation(train_size: int, seed: int, epoch: int) -> torch.Tensor:
    """Remark 4: the one random shuffle of the training set for ``epoch``."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
    return torch.randperm(train_size, generator=g)


def process_slice(k: int, n: int, rank: int, world: int) -> slice:
    """The samples of a global minibatch held by process ``rank``: its ``k/world`` workers' ``n`` each."""
    per = k // world
    return slice(rank * per * n, (rank + 1) * per * n)


@dataclass(frozen=True)
class BatchPlan:
    """Iteration ``iteration`` of ``epoch``: this process's share ``part`` of the global minibatch of ``kn``.

    ``indices`` are the training-set indices of the share (the epoch's permutation, cut as Remark 4 says).
    Augmentation draws come from the plan alone: per sample (:meth:`sample_seeds`, seeded by the sample's
    position in the epoch) or per global minibatch (:meth:`minibatch_generator`, whose draws for all ``kn``
    samples a source makes before it keeps this process's ``part`` of them)."""

    seed: int
    epoch: int
    iteration: int
    kn: int
    part: slice
    indices: torch.Tensor

    def sample_seeds(self) -> list[int]:
        """One seed per sample of the share, from ``(seed, epoch, position in the epoch)``."""
        base = self.iteration * self.kn
        return [mix_seed(self.seed, self.epoch, base + p) for p in range(self.part.start, self.part.stop)]

    def minibatch_generator(self, salt: int) -> torch.Generator:
        """A generator for draws made for the whole global minibatch, from ``(seed, epoch, iteration, salt)``."""
        return torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.iteration, salt))


def epoch_plans(train_size: int, k: int, n: int, rank: int, world: int, seed: int, epoch: int,
                start_iter: int = 0) -> list[BatchPlan]:
    """This process's plans of ``epoch`` from iteration ``start_iter`` on (a resumed epoch skips the others)."""
    kn, part = k * n, process_slice(k, n, rank, world)
    perm = epoch_permutation(train_size, seed, epoch)
    return [BatchPlan(seed, epoch, it, kn, part, perm[it * kn : (it + 1) * kn][part])
            for it in range(start_iter, train_size // kn)]


# --------------------------------------------------------------------------- validation shares


def val_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``total`` val images; rank 0's is the largest."""
    per = math.ceil(total / world)
    return min(rank * per, total), min((rank + 1) * per, total)
