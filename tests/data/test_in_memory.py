"""The in-memory source: small images decoded once (cached), pad-and-crop and flip as a batch; a file that cannot
be decoded is one line naming it."""

from __future__ import annotations

import pytest
import torch

from lbsgd_cli.data import InMemoryData, augment_batch, load_data, val_batches
from lbsgd_cli.errors import UserError

from ..conftest import make_image_tree
from .conftest import dcfg


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


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class=2, val_per_class=1)
    bad = root / "train" / "a" / "0001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="0001.jpg") as info:
        load_data(dcfg(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(info.value)
