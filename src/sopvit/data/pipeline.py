"""The stream of multi-crop batches a pre-training run consumes, indexed by micro-batch.

Which images a micro-batch holds depends only on (seed, micro-batch index), and how they are augmented
only on (seed, epoch, image), on both paths (``data.augment_on``): never on the number of DataLoader
workers, on the ranks or on whether the run was resumed. So a resumed run sees exactly the batches an
uninterrupted one would, and 2 ranks see the two halves of the global batch a single process would see.
"""

from __future__ import annotations

import signal
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sopvit.data.batched import BatchMultiCrop
from sopvit.data.config import DataConfig
from sopvit.data.counter_rng import image_keys, uniforms
from sopvit.data.datasets import InMemoryDataset, build_dataset
from sopvit.data.decode import BatchDecoder, FileBytesDataset
from sopvit.data.image_folder import ImageFolderDataset
from sopvit.data.masking import BlockMaskGenerator
from sopvit.data.prefetch import prefetch
from sopvit.data.seeding import SeededSamples, mix_seed
from sopvit.data.transforms import MultiCropTransform

# Counter-RNG streams of the two global views' masks (crop c uses stream c).
_MASK_STREAMS = (1 << 20, (1 << 20) + 1)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Workers ignore the signals a cluster sends to every process of a job (Slurm signals them all): a
    worker that died of one would make the loader raise in the trainer before it reached the step boundary
    where it saves. The trainer closes its loaders when it stops."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@dataclass
class Batch:
    crops: list[torch.Tensor]  # [global1, global2, local1, ...], each (B, C, s, s)
    masks: torch.Tensor  # bool (2B, gh, gw): global1 images, then global2 images
    ids: torch.Tensor  # (B,) data-set index of each image
    skipped: int  # unreadable files replaced in this batch
    cpu_decoded: int = 0  # augment_on=device: files the device decoder left to the CPU (not JPEG, refused)


class StepPlan:
    """Micro-batch m -> this rank's image indices: an epoch-seeded permutation cut into global batches,
    rank r taking slice r. An epoch holds whole optimizer steps of ``accum`` micro-batches (the incomplete
    last step is dropped), so a step never straddles two epochs and W ranks see in one step the images one
    process sees in W accumulated micro-batches: a run can resume on another world size with the same
    global batch."""

    def __init__(
        self, n_images: int, batch_size: int, world: int, rank: int, seed: int, accum: int = 1
    ) -> None:
        self.n_images, self.batch_size, self.world, self.rank, self.seed = (
            n_images,
            batch_size,
            world,
            rank,
            seed,
        )
        self.global_batch = batch_size * world
        micro_batches = n_images // self.global_batch
        if micro_batches == 0:
            raise ValueError(
                f"the data set has {n_images} images, fewer than one global batch "
                f"({batch_size} per process x {world} processes); lower train.batch_size"
            )
        if micro_batches < accum:
            raise ValueError(
                f"train.accum_steps={accum} exceeds the {micro_batches} micro-batches of one epoch"
            )
        self.steps_per_epoch = micro_batches // accum * accum  # micro-batches of an epoch's whole steps
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


def _pack_files(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A worker's batch of file bytes as one tensor (one shared-memory handle per batch, not per file)."""
    return {
        "data": torch.cat([item["data"] for item in items]),
        "sizes": torch.tensor([len(item["data"]) for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
        "label": torch.tensor([item["label"] for item in items]),
    }


def _unpack_files(packed: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    chunks = packed["data"].split(packed["sizes"].tolist())
    return [
        {"data": data, "index": int(i), "label": int(y)}
        for data, i, y in zip(chunks, packed["index"], packed["label"])
    ]


class _FlatSampler(_PlanSampler):
    """The plan's image indices alone (file reading does not depend on the epoch)."""

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        for m in range(self.start, self.stop):
            yield self.plan.indices(m).tolist()


class PretrainInputs:
    """Builds the data set named by the config and serves :class:`Batch` es from any micro-batch on."""

    def __init__(
        self,
        cfg: DataConfig,
        patch_size: int,
        batch_size: int,
        world: int,
        rank: int,
        seed: int,
        accum: int = 1,
    ) -> None:
        self.cfg = cfg
        self.spec = cfg.crop_spec()
        grid = cfg.global_size // patch_size
        self.masks = BlockMaskGenerator((grid, grid), ratio=cfg.mask_ratio, mask_prob=cfg.mask_prob)
        on_device = cfg.augment_on == "device"
        transform = None if on_device else MultiCropTransform(self.spec)
        self.dataset = build_dataset(cfg.dataset, cfg.path, "train", transform=transform, limit=cfg.limit)
        self.plan = StepPlan(len(self.dataset), batch_size, world, rank, seed, accum)  # type: ignore[arg-type]
        self.seed, self.rank = seed, rank

    def batches(self, start: int, stop: int, device: torch.device) -> Generator[Batch, None, None]:
        """Micro-batches ``start`` .. ``stop - 1``, augmented on the CPU workers or on ``device``."""
        if self.cfg.augment_on == "device":
            # The next batch is decoded and augmented while the current step runs.
            yield from prefetch(self._on_device(start, stop, device), device)
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
            worker_init_fn=_leave_signals_to_the_trainer,
        )
        yield from loader

    def device_masks(self, keys: torch.Tensor) -> torch.Tensor:
        """bool ``(2B, gh, gw)`` masks of the two global views of images with ``keys`` ``(B,)``."""
        count = self.masks.uniforms_per_mask
        return torch.cat([self.masks.from_uniforms(uniforms(keys, s, count)) for s in _MASK_STREAMS])

    def _on_device(self, start: int, stop: int, device: torch.device) -> Iterator[Batch]:
        augment = BatchMultiCrop(self.spec)
        for m, images, requested, ids, skipped, cpu_decoded in self._decoded(start, stop, device):
            # Keyed by the requested image, as the per-sample path seeds a replaced unreadable file.
            keys = image_keys(self.seed, m // self.plan.steps_per_epoch, requested)
            crops = augment(images, keys)
            masks = self.device_masks(keys).to(device, non_blocking=True)
            yield Batch(crops=crops, masks=masks, ids=ids, skipped=skipped, cpu_decoded=cpu_decoded)

    def _decoded(
        self, start: int, stop: int, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor, int, int]]:
        """(micro-batch, images on ``device``, requested and loaded image ids, skipped, CPU-decoded files)."""
        if isinstance(self.dataset, InMemoryDataset):
            images = self.dataset.images.to(device)
            for m in range(start, stop):
                idx = self.plan.indices(m)
                yield m, images[idx.to(device)], idx, idx, 0, 0
            return
        # A folder or tar shards (data.limit wraps either in a Subset); shards read through their index.
        source = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        files = FileBytesDataset(cast(ImageFolderDataset, source))
        loader = DataLoader(
            files,
            batch_sampler=_FlatSampler(self.plan, start, stop),
            num_workers=self.cfg.num_workers,
            collate_fn=_pack_files,
            pin_memory=False,
            persistent_workers=False,
            generator=torch.Generator(),
            worker_init_fn=_leave_signals_to_the_trainer,
        )
        decode = BatchDecoder()
        for m, packed in enumerate(loader, start):
            items = _unpack_files(packed)
            decoded = decode(items, files, device, self.cfg.in_chans)
            requested = torch.tensor([item["index"] for item in items])
            yield m, decoded.images, requested, decoded.indices, decoded.skipped, decoded.cpu_fallbacks
