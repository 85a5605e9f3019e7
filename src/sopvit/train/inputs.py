"""The stream of multi-crop batches a pre-training run consumes, indexed by micro-batch.

Which images a micro-batch holds depends only on (seed, micro-batch index), and how they are augmented
only on (seed, epoch, image) for the per-sample path, or (seed, micro-batch, rank) for the batched path:
never on the number of DataLoader workers or on whether the run was resumed. So a resumed run sees
exactly the batches an uninterrupted one would, and (per-sample path) 2 ranks see the two halves of the
global batch a single process would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from sopvit.config.pretrain import DataConfig
from sopvit.data.batched import BatchMultiCrop
from sopvit.data.datasets import InMemoryDataset, build_dataset
from sopvit.data.masking import BlockMaskGenerator
from sopvit.data.seeding import SeededSamples, mix_seed
from sopvit.data.transforms import MultiCropTransform


@dataclass
class Batch:
    crops: list[torch.Tensor]  # [global1, global2, local1, ...], each (B, C, s, s)
    masks: torch.Tensor  # bool (2B, gh, gw): global1 images, then global2 images
    ids: torch.Tensor  # (B,) data-set index of each image
    skipped: int  # unreadable files replaced in this batch


class StepPlan:
    """Micro-batch m -> this rank's image indices: an epoch-seeded permutation cut into global batches
    (the incomplete last global batch of an epoch is dropped), rank r taking slice r."""

    def __init__(self, n_images: int, batch_size: int, world: int, rank: int, seed: int) -> None:
        self.n_images, self.batch_size, self.world, self.rank, self.seed = (
            n_images,
            batch_size,
            world,
            rank,
            seed,
        )
        self.global_batch = batch_size * world
        self.steps_per_epoch = n_images // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {n_images} images, fewer than one global batch "
                f"({batch_size} per process x {world} processes); lower train.batch_size"
            )
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int) -> torch.Tensor:
        epoch, position = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(
                self.n_images, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            )
            self._epoch = epoch
        start = position * self.global_batch + self.rank * self.batch_size
        return self._perm[start : start + self.batch_size]


class _SeededSamples(Dataset[dict[str, Any]]):
    """Per-sample path: augmentation and masks seeded by (seed, epoch, image index), so they do not depend
    on how the global batch is split over ranks or micro-batches."""

    def __init__(self, dataset: Dataset[dict[str, Any]], masks: BlockMaskGenerator, seed: int) -> None:
        self.samples, self.masks, self.seed = SeededSamples(dataset, seed), masks, seed

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.samples.set_epoch(epoch)
        sample = dict(self.samples[index])
        sample["masks"] = self.masks.sample(
            2, torch.Generator().manual_seed(mix_seed(self.seed, epoch, index) ^ 1)
        )
        return sample


def _collate(samples: list[dict[str, Any]]) -> Batch:
    n_crops = len(samples[0]["image"])
    return Batch(
        crops=[torch.stack([s["image"][c] for s in samples]) for c in range(n_crops)],
        masks=torch.stack([s["masks"] for s in samples], dim=1).flatten(0, 1),
        ids=torch.tensor([s["index"] for s in samples]),
        skipped=sum(int(s["skipped"]) for s in samples),
    )


class _PlanSampler:
    def __init__(self, plan: StepPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for m in range(self.start, self.stop):
            epoch = m // self.plan.steps_per_epoch
            yield [(epoch, int(i)) for i in self.plan.indices(m)]

    def __len__(self) -> int:
        return self.stop - self.start


class PretrainInputs:
    """Builds the data set named by the config and serves :class:`Batch` es from any micro-batch on."""

    def __init__(
        self, cfg: DataConfig, patch_size: int, batch_size: int, world: int, rank: int, seed: int
    ) -> None:
        self.cfg = cfg
        self.spec = cfg.crop_spec()
        grid = cfg.global_size // patch_size
        self.masks = BlockMaskGenerator((grid, grid), ratio=cfg.mask_ratio, mask_prob=cfg.mask_prob)
        transform = None if cfg.batched_augment else MultiCropTransform(self.spec)
        self.dataset = build_dataset(cfg.dataset, cfg.path, "train", transform=transform, limit=cfg.limit)
        if cfg.batched_augment and not isinstance(self.dataset, InMemoryDataset):
            raise ValueError(
                f"data.batched_augment needs an in-memory data set (fashion_mnist, cifar10, cifar100), "
                f"not '{cfg.dataset}'"
            )
        self.plan = StepPlan(len(self.dataset), batch_size, world, rank, seed)  # type: ignore[arg-type]
        self.seed, self.rank = seed, rank

    def batches(self, start: int, stop: int, device: torch.device) -> Iterator[Batch]:
        """Micro-batches ``start`` .. ``stop - 1``, augmented on the CPU workers or on ``device``."""
        if isinstance(self.dataset, InMemoryDataset) and self.cfg.batched_augment:
            yield from self._batched(start, stop, device)
            return
        loader = DataLoader(
            _SeededSamples(self.dataset, self.masks, self.seed),
            batch_sampler=_PlanSampler(self.plan, start, stop),
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            # Without its own generator the loader draws its workers' base seed from the global RNG each
            # time it starts, so a resumed run's drop path would drift from the uninterrupted run's. No
            # augmentation uses that base seed (they are seeded by seed, epoch and image).
            generator=torch.Generator(),
        )
        yield from loader

    def _batched(self, start: int, stop: int, device: torch.device) -> Iterator[Batch]:
        augment = BatchMultiCrop(self.spec)
        images = cast(InMemoryDataset, self.dataset).images.to(device)
        for m in range(start, stop):
            idx = self.plan.indices(m)
            gen = torch.Generator().manual_seed(mix_seed(self.seed, m, self.rank))
            crops = augment(images[idx.to(device)], gen)
            masks = self.masks.sample(2 * len(idx), gen)
            yield Batch(crops=crops, masks=masks, ids=idx, skipped=0)
