"""Data side of fine-tuning: the BEiT-style train augmentation, labels of any split, low-shot subsets."""

from __future__ import annotations

from typing import Any, cast

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from sopvit.data.datasets import ImageFolderDataset, InMemoryDataset
from sopvit.data.transforms import MultiCropSpec, to_uint8_chw
from sopvit.eval.logreg import fraction_subset, read_subset_file


class FinetuneTrainTransform:
    """Random resized crop + flip + RandAugment on uint8, then float + normalise.

    RandAugment runs on uint8 before normalisation because its photometric ops (posterize, solarize,
    equalize) are defined on [0, 255] pixels. ``__call__(PIL or uint8 (C, H, W)) -> float (C, size, size)``.
    """

    def __init__(
        self, size: int, in_chans: int, randaug_n: int, randaug_m: int, crop_scale: tuple[float, float]
    ) -> None:
        self.in_chans = in_chans
        mean, std = MultiCropSpec(in_chans=in_chans).stats
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if randaug_n > 0:
            steps.append(v2.RandAugment(num_ops=randaug_n, magnitude=randaug_m))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.pipeline = v2.Compose(steps)

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        return cast(Tensor, self.pipeline(to_uint8_chw(img, self.in_chans)))


def dataset_labels(ds: Dataset[dict[str, Any]]) -> Tensor:
    """int64 labels of a ``build_dataset`` result, read without decoding any image."""
    if isinstance(ds, InMemoryDataset):
        return ds.labels
    if isinstance(ds, ImageFolderDataset):
        return torch.as_tensor(ds.labels, dtype=torch.int64)
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    raise ValueError(f"dataset: cannot read labels of {type(ds).__name__}")


def low_shot_indices(
    labels: Tensor, subset_file: str | None, subset_fraction: float | None, seed: int
) -> Tensor:
    """Indices of the labelled subset (1%/10% semi-supervised protocol); all indices when neither is set."""
    if subset_file is not None:
        return read_subset_file(subset_file, labels.numel())
    if subset_fraction is not None:
        return fraction_subset(labels, subset_fraction, seed)
    return torch.arange(labels.numel())
