"""Data: the sources of images and labels, Remark 4's sampling and loader (§3), the paper's augmentation (§5.1).

A batch runs one way: source -> sampler -> loader -> engine.

  load        ``data.name`` / ``data.in_memory`` -> the source (:func:`load_data`)
  source      the :class:`DataSource` protocol, ImageFolder trees, stratified subsets, normalisation
  in_memory   small images decoded once into uint8 tensors, augmented as batches on the device
  digits      scikit-learn's 8x8 digits, in memory
  cifar       torchvision's CIFAR batches, read without running their pickles, in memory
  streaming   ImageNet-sized files decoded by loader workers, batches copied to the device and normalised
  transforms  §5.1's crops of one file (reduced-size JPEG decoding), data.decode=gpu's device decode
  decode      libjpeg-turbo decoding (simplejpeg), PIL where it cannot
  bad_data    broken files: one line naming the file, or data.skip_bad=true to skip and count
  sampling    Remark 4: the epoch's permutation, this process's share, per-sample seeds (:class:`BatchPlan`)
  loader      :class:`TrainLoader` (plans -> the source's batches) and the val shares
"""

from __future__ import annotations

from .in_memory import InMemoryData, TensorSplit, augment_batch
from .load import load_data
from .loader import TrainLoader, largest_val_share_batches, val_batches
from .sampling import BatchPlan, epoch_permutation, mix_seed, process_slice, val_share
from .source import DataSource
from .streaming import StreamingData

__all__ = [
    "BatchPlan",
    "DataSource",
    "InMemoryData",
    "StreamingData",
    "TensorSplit",
    "TrainLoader",
    "augment_batch",
    "epoch_permutation",
    "largest_val_share_batches",
    "load_data",
    "mix_seed",
    "process_slice",
    "val_batches",
    "val_share",
]
