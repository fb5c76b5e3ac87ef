"""Remark 4 (§3): one permutation per epoch, the same for every process count; the processes' shares tile the
global minibatch."""

from __future__ import annotations

import torch

from lbsgd_cli.data.sampling import epoch_permutation, process_slice


def test_one_permutation_per_epoch_same_for_every_process_count():
    p0, p0b, p1 = epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 1)
    assert torch.equal(p0, p0b) and not torch.equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(100))


def test_process_shares_tile_the_global_minibatch():
    k, n = 8, 4
    for world in (1, 2, 4, 8):
        parts = [process_slice(k, n, r, world) for r in range(world)]
        covered = [i for s in parts for i in range(s.start, s.stop)]
        assert covered == list(range(k * n))
