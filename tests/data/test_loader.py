"""The loader: Remark 4's plans handed to the source, its batches passed on; W processes see the one-process
batches, a resumed epoch the remaining ones, each sample at most once per epoch."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import TrainLoader, load_data


def _digits_loader(rank, world, k=4, n=8):
    data = load_data(OmegaConf.structured(DataConfig(name="digits", pad=1, flip=False)))
    return TrainLoader(data, k, n, rank, world, seed=3, device=torch.device("cpu"))


def test_two_processes_see_exactly_the_one_process_batches():
    one = list(_digits_loader(0, 1).epoch(2))
    r0, r1 = list(_digits_loader(0, 2).epoch(2)), list(_digits_loader(1, 2).epoch(2))
    assert len(one) == len(r0) == 1437 // 32  # last incomplete minibatch dropped
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        torch.testing.assert_close(x, torch.cat([x0, x1]), rtol=0, atol=0)
        assert torch.equal(y, torch.cat([y0, y1]))


def test_resume_mid_epoch_yields_the_remaining_batches():
    full = list(_digits_loader(0, 1).epoch(1))
    rest = list(_digits_loader(0, 1).epoch(1, start_iter=5))
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], rest))


def test_every_sample_at_most_once_per_epoch():
    loader = _digits_loader(0, 1, k=2, n=16)
    seen = torch.cat([plan.indices for plan in loader.plans(0)])
    assert len(set(seen.tolist())) == len(seen) == len(loader) * 32


class _PlansRecorded:
    """A source that records the plans it is given and makes one batch per plan from them."""

    train_size = 20

    def __init__(self) -> None:
        self.seen: list = []

    def train_batches(self, plans, device):
        for plan in plans:
            self.seen.append(plan)
            yield plan.indices.float().to(device), torch.tensor(plan.sample_seeds())


def test_the_loader_hands_the_source_its_plans_and_passes_its_batches_on():
    """One way: the loader plans (Remark 4: the epoch's permutation, this process's share, per-sample seeds)
    and the source makes the batches; the loader neither stores images nor asks what kind of source it has."""
    from lbsgd_cli.data.sampling import epoch_permutation, mix_seed

    source = _PlansRecorded()
    loader = TrainLoader(source, 4, 2, rank=1, world=2, seed=7)
    batches = list(loader.epoch(3, start_iter=1))
    perm = epoch_permutation(20, 7, 3)
    assert len(loader) == 2 and len(batches) == 1 and [p.iteration for p in source.seen] == [1]
    plan = source.seen[0]
    assert plan.part == slice(4, 8) and torch.equal(plan.indices, perm[8:16][4:8])
    x, seeds = batches[0]
    assert torch.equal(x, perm[12:16].float())  # rank 1's half of iteration 1's minibatch of 8
    assert seeds.tolist() == [mix_seed(7, 3, p) for p in range(12, 16)]  # seeded by position in the epoch
