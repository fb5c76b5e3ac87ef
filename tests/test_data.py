"""Data: Remark 4's shuffle, W-invariant shares, augmentation, ImageFolder trees and their errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.config import DataConfig
from lbsgd_cli.data import (
    InMemoryData,
    TrainLoader,
    augment_batch,
    epoch_permutation,
    load_data,
    process_slice,
    val_batches,
)
from lbsgd_cli.data.source import scan_imagefolder, stratified_subset
from lbsgd_cli.errors import UserError

from .conftest import make_image_tree


def dcfg(**kw):
    return OmegaConf.structured(DataConfig(**{"name": "imagefolder", **kw}))


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


def test_augment_pad_crop_and_flip():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    same = augment_batch(x, torch.tensor([[1, 1], [1, 1]]), torch.tensor([False, False]), 1, True)
    assert torch.equal(same, x)  # offset = pad: the original image
    shifted = augment_batch(x, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, True]), 1, True)
    assert shifted[0, 0, 0].tolist() == [0, 0, 0] and shifted[0, 0, 1].tolist() == [0, 0, 1]
    assert shifted[1, 0, 0].tolist() == [0, 14, 13]  # shifted down-right, then flipped


def test_small_imagefolder_is_decoded_in_memory(tmp_path):
    root = make_image_tree(tmp_path / "d", size=16)
    data = load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert isinstance(data, InMemoryData)
    assert data.train.x.shape == (24, 3, 16, 16) and data.val_size == 12 and data.classes == ["a", "b", "c"]
    assert list((tmp_path / "cache").glob("*.pt"))  # decoded once, cached
    again = load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert torch.equal(again.train.x, data.train.x)
    xb, yb = next(val_batches(data, 0, 1, 5, torch.device("cpu")))
    assert xb.shape == (5, 3, 16, 16) and xb.dtype == torch.float32



def test_train_and_val_subsets_are_stratified_in_memory_and_streaming(tmp_path):
    root = make_image_tree(tmp_path / "d", size=16, per_class=8, val_per_class=4)
    for extra in ({"cache_dir": str(tmp_path / "cache")}, {"in_memory": "false", "num_workers": 0}):
        data = load_data(dcfg(root=str(root), train_subset=12, val_subset=6, **extra))
        assert data.val_size == 6
        labels = [int(y) for _, yb in val_batches(data, 0, 1, 6, torch.device("cpu")) for y in yb]
        assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_stratified_subset_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    sub = stratified_subset(labels, 10)
    assert [sum(labels[i] == c for i in sub) for c in range(3)] == [5, 3, 2]


@pytest.mark.parametrize("breakage,message", [
    ("missing", "does not exist"),
    ("no_train", "has no train/ folder"),
    ("empty_class", "has no images"),
    ("val_extra_class", "val/ has classes that train/ lacks"),
])
def test_bad_trees_are_one_line_errors(tmp_path, breakage, message):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    if breakage == "missing":
        root = tmp_path / "nope"
    elif breakage == "no_train":
        import shutil
        shutil.rmtree(root / "train")
    elif breakage == "empty_class":
        for f in (root / "train" / "b").iterdir():
            f.unlink()
    elif breakage == "val_extra_class":
        (root / "val" / "zzz").mkdir()
    with pytest.raises(UserError, match=message) as info:
        scan_imagefolder(root)
    assert "\n" not in str(info.value)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    bad = root / "train" / "a" / "0001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="0001.jpg") as info:
        load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(info.value)
