"""Remark 4's loader (§3): the plans of each epoch (:mod:`lbsgd_cli.data.sampling`) handed to the data set,
whose batches go to the engine.

A batch runs one way: the sampler plans it, the source (:class:`~lbsgd_cli.data.source.DataSource`: in
memory, streaming) makes it on the device, the loader hands it on. The loader knows nothing of how a
source stores or decodes its images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .sampling import BatchPlan, epoch_plans, val_share
from .source import DataSource


class TrainLoader:
    """Yields, per iteration, this process's share ``(x, y)`` of the global minibatch of ``k*n``."""

    def __init__(self, data: DataSource, k: int, n: int, rank: int = 0, world: int = 1, *, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.data, self.k, self.n, self.rank, self.world = data, k, n, rank, world
        self.seed, self.device = seed, torch.device(device)
        self.kn = k * n
        self.iters = data.train_size // self.kn

    def __len__(self) -> int:
        return self.iters

    def plans(self, epoch: int, start_iter: int = 0) -> list[BatchPlan]:
        """This process's plans of ``epoch`` from ``start_iter`` on (Remark 4's shuffle, share and seeds)."""
        return epoch_plans(self.data.train_size, self.k, self.n, self.rank, self.world, self.seed, epoch, start_iter)

    def epoch(self, epoch: int, start_iter: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The normalised batches of ``epoch`` on the loader's device, from iteration ``start_iter`` on."""
        yield from self.data.train_batches(self.plans(epoch, start_iter), self.device)


# --------------------------------------------------------------------------- validation shares


def largest_val_share_batches(data: DataSource, world: int, batch_size: int) -> int:
    """How many batches the largest share (rank 0's) of the val set takes."""
    lo, hi = val_share(data.val_size, 0, world)
    return math.ceil((hi - lo) / batch_size)


def val_batches(data: DataSource, rank: int, world: int, batch_size: int, device: torch.device):
    """This process's contiguous share of the val set, in batches; each image is seen once overall."""
    lo, hi = val_share(data.val_size, rank, world)
    yield from data.val_batches(lo, hi, batch_size, device)
