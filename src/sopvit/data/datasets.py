"""In-memory data sets (Fashion-MNIST, CIFAR) and the ``build_dataset`` factory."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.data.image_folder import ImageFolderDataset
from sopvit.data.shards import ShardDataset

# ImageFolderDataset and load_fashion_mnist live in their own modules but belong to this API.
__all__ = [
    "DATASET_NAMES",
    "ImageFolderDataset",
    "InMemoryDataset",
    "build_dataset",
    "load_cifar",
    "load_fashion_mnist",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "folder", "imagenet", "shards")
_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sopvit")


class InMemoryDataset(Dataset[dict[str, Any]]):
    """A uint8 image tensor held in memory, in the same dict format as ``ImageFolderDataset``.

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: int ``(N,)``; None gives label -1 everywhere.
        transform: applied to the uint8 ``(C, H, W)`` image; None returns it unchanged.

    ``__getitem__(i)`` -> ``{"image", "index": i, "label": int, "skipped": 0}``. The device
    path (``data.augment_on=device``) reads ``images`` directly instead of indexing sample by sample.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
            raise TypeError(f"images must be a uint8 tensor of shape (N, C, H, W), got {what}")
        if labels is None:
            labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        if not isinstance(labels, Tensor) or labels.shape != (images.shape[0],):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels)
            raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},), got {shape}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return int(self.labels.max().item()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={tuple(self.images.shape)}, classes={self.num_classes})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "index": index, "label": int(self.labels[index]), "skipped": 0}


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def load_cifar(
    name: str, split: str = "train", root: str | None = None, download: bool = False, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """CIFAR-10/100 via torchvision as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ``root`` defaults to ``~/.cache/sopvit``; ``download=True`` fetches the archive if absent.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    classes = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    if name not in classes:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    _check_split(split, ("train", "test"))
    root = _CACHE_DIR if root is None else root
    try:
        ds = classes[name](root, train=split == "train", download=download)
    except RuntimeError as exc:
        hint = "" if download else "; pass download=True to fetch it"
        raise FileNotFoundError(f"{name} not found or corrupted under {root!r}{hint} ({exc})") from exc
    data = np.asarray(ds.data)[:limit]
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(ds.targets)[:limit], dtype=torch.int64)
    return images, labels


def build_dataset(
    name: str,
    path: str | None = None,
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    download: bool = False,
    limit: int | None = None,
    labelled: bool | None = None,
) -> Dataset[dict[str, Any]]:
    """Builds a data set whose items are ``{"image", "index", "label", "skipped"}`` dicts.

    Args:
        name: one of ``DATASET_NAMES``. "fashion_mnist"/"cifar10"/"cifar100" give an
            ``InMemoryDataset`` (uint8 images held in memory); "folder" scans
            ``path`` recursively; "imagenet" reads the labelled folder ``path/split``; "shards"
            reads the tar shards ``path`` names (``{split}`` in it replaced by ``split``).
        path: data root; optional for the in-memory sets (defaults as in their loaders).
        split: "train" or "test" ("val" is accepted as "test" for the in-memory sets); for
            "imagenet" the name of the subfolder, for "shards" what ``{split}`` stands for; ignored by
            "folder".
        transform: per-sample transform (e.g. ``MultiCropTransform``).
        download: allow torchvision to download CIFAR.
        limit: keep only the first ``limit`` samples (tests, smoke runs).
        labelled: class-subfolder labelling for "folder" (see ``ImageFolderDataset``).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if name in ("fashion_mnist", "cifar10", "cifar100"):
        split = "test" if split == "val" else split
        if name == "fashion_mnist":
            images, labels = load_fashion_mnist(split, root=path, limit=limit)
        else:
            images, labels = load_cifar(name, split, root=path, download=download, limit=limit)
        return InMemoryDataset(images, labels, transform)
    if path is None:
        raise ValueError(f"dataset {name!r} needs a path")
    if name == "imagenet":
        folder = ImageFolderDataset(os.path.join(path, split), transform, labelled=True)
    elif name == "shards":
        folder = ShardDataset(path.replace("{split}", split), transform)
    else:
        folder = ImageFolderDataset(path, transform, labelled=labelled)
    logger.info("built %r", folder)
    if limit is not None and limit < len(folder):
        return Subset(folder, range(limit))
    return folder
