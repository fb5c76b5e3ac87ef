"""scikit-learn's bundled 8x8 handwritten digits (``data=digits``): a real data set with no download, in memory."""

from __future__ import annotations

import torch

from .in_memory import InMemoryData, TensorSplit, channel_stats


def load_digits_data(dcfg) -> InMemoryData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, 10 classes), no download."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    idx_train, idx_val = train_test_split(
        list(range(len(y))), test_size=dcfg.val_fraction, random_state=0, stratify=digits.target
    )
    idx_train, idx_val = sorted(idx_train), sorted(idx_val)
    train = TensorSplit(x[idx_train], y[idx_train]).subset(dcfg.train_subset)
    mean, std = channel_stats(train.x) if dcfg.mean is None else (tuple(dcfg.mean), tuple(dcfg.std))
    return InMemoryData(
        train, TensorSplit(x[idx_val], y[idx_val]), [str(c) for c in range(10)], mean, std, dcfg.pad, dcfg.flip
    )
