"""load_data: in memory or streaming as data.in_memory decides, subsets stratified either way; small images
streamed as much larger crops are said in one line."""

from __future__ import annotations

import torch

from lbsgd_cli.data import load_data, val_batches

from ..conftest import make_image_tree
from .conftest import dcfg


def test_train_and_val_subsets_are_stratified_in_memory_and_streaming(tmp_path):
    root = make_image_tree(tmp_path / "d", size=16, per_class=8, val_per_class=4)
    for extra in ({"cache_dir": str(tmp_path / "cache")}, {"in_memory": "false", "num_workers": 0}):
        data = load_data(dcfg(root=str(root), train_subset=12, val_subset=6, **extra))
        assert data.val_size == 6
        labels = [int(y) for _, yb in val_batches(data, 0, 1, 6, torch.device("cpu")) for y in yb]
        assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_small_images_streamed_as_much_larger_crops_are_said_in_one_line(tmp_path, capsys):
    """A CIFAR-sized tree with data.in_memory=false streams crop_size crops (224: 49x the pixels of 32x32): one
    line names the keys to set. In memory, and with crops near the images' size, nothing is said; the
    streamed batches are the ones they were (the line changes no result)."""
    root = make_image_tree(tmp_path / "d", size=16)
    data = load_data(dcfg(root=str(root), in_memory="false", num_workers=0))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "16x16" in lines[0] and "224x224 crops (data.crop_size)" in lines[0], lines
    assert "data.in_memory=true" in lines[0] and "data.crop_size=16 data.val_resize=16" in lines[0]
    x, _ = next(val_batches(data, 0, 1, 4, torch.device("cpu")))
    assert x.shape == (4, 3, 224, 224)
    load_data(dcfg(root=str(root), in_memory="true", cache_dir=str(tmp_path / "cache")))
    load_data(dcfg(root=str(root), in_memory="false", crop_size=24, val_resize=28, num_workers=0))
    big = make_image_tree(tmp_path / "big", size=80, per_class=2, val_per_class=1)
    load_data(dcfg(root=str(big), in_memory="false", crop_size=224, num_workers=0))  # not small: streamed as meant
    assert capsys.readouterr().out == ""
