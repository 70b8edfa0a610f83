"""The scikit-learn digits: 1,797 real 8×8 grey images of handwritten digits, lab 06's data set.

They ship inside scikit-learn (pixel values 0–16), so nothing is downloaded. The split is fixed (stratified, seed 0:
1,437 train, 360 test) and pixels are standardised with the training set's mean and standard deviation::

    data = load_digits_split()
    for x, y in ShardedLoader(data.x_train, data.y_train, batch_size=32, rank=0, world_size=2, epoch=0): ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DigitsData:
    """The fixed split, standardised: images (N, 1, 8, 8) float32, labels (N,) int64; raw 0–16 pixels kept too."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_test: torch.Tensor
    mean: float
    std: float


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """scikit-learn's 8×8 digits, split once and for all (stratified by class, ``seed``), standardised with the
    training pixels' mean and standard deviation. Every call, on every rank, returns the same tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=labels.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
    norm = (images - mean) / std
    return DigitsData(norm[train_idx], labels[train_idx], norm[test_idx], labels[test_idx], images[test_idx],
                      mean, std)


class ShardedLoader:
    """One epoch of mini-batches for one rank: a shuffle shared by all ranks (seeded by ``seed`` and ``epoch``), of
    which rank r takes every ``world_size``-th example starting at r. Each rank gets ``len(self)`` full batches
    of ``batch_size`` (the global batch is ``batch_size × world_size``); the remainder of the epoch is dropped so
    that every rank takes the same number of steps. ``shuffle=False`` keeps the order (evaluation), and then
    ``drop_last=False`` keeps the last, shorter batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if len(x) < batch_size * world_size and drop_last:
            raise ValueError(f"{len(x)} examples do not make one batch of {batch_size} on each of {world_size} "
                             "ranks: lower the batch size")
        if shuffle:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        else:
            order = torch.arange(len(x))
        self.indices = order[rank::world_size]
        if drop_last:
            per_rank = len(x) // (batch_size * world_size) * batch_size
            self.indices = self.indices[:per_rank]
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]
