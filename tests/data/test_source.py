"""ImageFolder trees and stratified subsets: what every source builds on; a broken tree is one line."""

from __future__ import annotations

import pytest

from lbsgd_cli.data.source import scan_imagefolder, stratified_subset
from lbsgd_cli.errors import UserError

from ..conftest import make_image_tree


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
