"""Iterates an in-memory data set in batches augmented by ``BatchMultiCrop`` (no DataLoader workers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sopvit.data.batched import BatchMultiCrop
from sopvit.data.datasets import InMemoryDataset
from sopvit.data.masking import BlockMaskGenerator

__all__ = ["BatchedMultiCropLoader"]


class BatchedMultiCropLoader:
    """Yields the same batch dicts as ``MultiCropCollate`` from an ``InMemoryDataset``.

    Args:
        dataset: uint8 images ``(N, C, H, W)`` and labels.
        batch_size: samples per batch (per rank).
        multicrop: the batched augmentation.
        mask_generator: iBOT masks of the global crops.
        n_globals: leading crops that are masked.
        shuffle / drop_last: as in ``DataLoader``.
        device: where images live and crops are computed (moved once, on first iteration).
        seed: with a seed, epoch ``e`` is reproducible from ``(seed, e)`` (see ``set_epoch``);
            without one, torch's global RNG is used.
        rank / world_size: each rank takes every ``world_size``-th sample of the shared
            permutation, as ``DistributedSampler`` does.

    Each batch: ``crops`` list of float ``(B, C, s, s)``, ``masks`` bool
    ``(n_globals * B, gh, gw)`` ordered [global1 batch; global2 batch], ``index`` and ``label``
    int64 ``(B,)`` on ``device``, ``skipped`` 0.
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        multicrop: BatchMultiCrop,
        mask_generator: BlockMaskGenerator,
        n_globals: int = 2,
        shuffle: bool = True,
        drop_last: bool = True,
        device: torch.device | str | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(dataset, InMemoryDataset):
            raise TypeError(f"dataset must be an InMemoryDataset, got {type(dataset).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n_globals < 1:
            raise ValueError(f"n_globals must be >= 1, got {n_globals}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.multicrop = multicrop
        self.mask_generator = mask_generator
        self.n_globals = n_globals
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._images: torch.Tensor | None = None
        if len(self) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} samples gives no batch of {batch_size} on {world_size} rank(s)"
            )

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation and augmentation stream of ``epoch`` (only with a seed)."""
        self.epoch = epoch

    def _samples_per_rank(self) -> int:
        return len(self.dataset) // self.world_size

    def __len__(self) -> int:
        n = self._samples_per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self._images is None:
            self._images = self.dataset.images.to(self.device)
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        # Equal shares keep ranks in lock-step (same number of batches), as DistributedSampler
        # does after padding; here the remainder is dropped instead of duplicated.
        order = order[self.rank : self._samples_per_rank() * self.world_size : self.world_size]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self._images[index.to(self.device)]
            crops = self.multicrop(images, generator)
            masks = self.mask_generator.sample(self.n_globals * len(index), generator)
            yield {
                "crops": crops,
                "masks": masks.to(self.device),
                "index": index.to(self.device),
                "label": self.dataset.labels[index].to(self.device),
                "skipped": 0,
            }
