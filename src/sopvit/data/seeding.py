"""Augmentation that depends on (seed, epoch, image) only, never on workers, batch size or ranks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (a splitmix-style hash; Python's hash() is salted)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class SeededSamples(Dataset[Any]):
    """``dataset[i]`` with torch's, numpy's and Python's global RNGs seeded by ``(seed, epoch, i)``.

    torchvision's transforms draw from torch's global RNG and timm's RandAugment from numpy's and
    Python's, so without this an image's augmentation depends on which DataLoader worker (or how many
    images before it in the same process) drew first: results would change with ``num_workers`` and the
    batch size. The caller's RNG streams are left as they were. Call :meth:`set_epoch` before iterating
    an epoch, as with ``DistributedSampler`` (workers started afterwards see the new epoch).
    """

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed = mix_seed(self.seed, self.epoch, index)
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(numpy_state)
                random.setstate(python_state)
