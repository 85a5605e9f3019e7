"""The per-image seed: pinned hash values, and which RNGs it seeds with what."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from sopvit.data.seeding import SeededSamples, mix_seed


def test_mix_seed_values_are_pinned() -> None:
    # Changing the hash would silently change every run's data order and augmentations.
    assert mix_seed(0) == 8675603959156289547
    assert mix_seed(1, 2, 3) == 5698153134970070594
    assert mix_seed(2**40, 7) == 8619143367195687011


class _Draws(Dataset[tuple[float, float, float]]):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return float(torch.rand(())), float(np.random.rand()), random.random()


def _expected(seed: int) -> tuple[float, float, float]:
    torch_value = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
    numpy_value = float(np.random.RandomState(seed % 2**32).rand())
    return torch_value, numpy_value, random.Random(seed).random()


def test_each_rng_is_seeded_from_seed_epoch_and_index() -> None:
    samples = SeededSamples(_Draws(), seed=11)
    samples.set_epoch(3)
    for index in (0, 7):
        assert samples[index] == _expected(mix_seed(11, 3, index))
    assert SeededSamples(_Draws(), seed=12)[0] != SeededSamples(_Draws(), seed=11)[0]
