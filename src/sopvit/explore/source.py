"""The images ``sopvit embed`` reads: a folder (class subfolders give labels) or tar shards.

Training's data sets replace an unreadable file by the next good one, so that every batch stays full; an
embeddings table must not: the replacement would appear under the bad file's path with another image's
vector. Here each image is decoded on its own, and a bad one comes back as a reason instead of a tensor:
the run lists it in ``_unreadable.txt`` and writes no row for it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sopvit.data.datasets import ImageFolderDataset, build_dataset
from sopvit.data.shard_index import MANIFEST


def is_shards(data: str) -> bool:
    """Tar shards: a ``.tar`` pattern or file, or a folder holding ``sopvit shards write``'s manifest."""
    if os.path.isdir(data):
        return os.path.isfile(os.path.join(data, MANIFEST))
    return ".tar" in os.path.basename(data)


def open_images(data: str) -> tuple[ImageFolderDataset, str]:
    """The data set of ``--data`` (absolute paths, so table rows name files from any directory) and how
    it was read: "folder" or "shards". Missing or empty inputs raise one-line errors."""
    where = os.path.abspath(data)
    kind = "shards" if is_shards(data) else "folder"
    if kind == "folder" and not os.path.isdir(where):
        what = "is a file, not a folder" if os.path.exists(where) else "does not exist"
        raise FileNotFoundError(
            f"--data {data} {what}: pass an image folder, a folder of shards or a shard pattern "
            "(PREFIX-{000..009}.tar)"
        )
    images = build_dataset(kind, where)  # raises "no image files found under ..." on an empty folder
    return cast(ImageFolderDataset, images), kind


@dataclass
class Batch:
    """The readable images of one batch, and the unreadable ones with their reasons."""

    indices: list[int]
    images: Tensor  # (B, C, H, W), B = len(indices); (0,) when none was readable
    labels: list[int]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (data-set index, reason)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin_memory thread: page-locked images copy to the GPU asynchronously."""
        self.images = self.images.pin_memory()
        return self


class StrictImages(Dataset[tuple[int, Tensor | None, int, str]]):
    """``images`` decoded one by one: item ``i`` is ``(i, tensor or None, label, reason)``."""

    def __init__(self, images: ImageFolderDataset, transform: Callable[[Any], Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, int, str]:
        label = int(self.images.labels[index])
        with warnings.catch_warnings():
            # The run lists bad files itself; the data set's per-file warning would repeat each one.
            warnings.simplefilter("ignore", RuntimeWarning)
            # try_load is the per-item decode under __getitem__'s skip-to-next loop, for folders and shards.
            image = self.images.try_load(index)
        if image is None:
            return index, None, label, self.images.unreadable.get(index, "could not be decoded")
        try:
            return index, self.transform(image), label, ""
        except Exception as exc:  # a decodable file the transform cannot take (e.g. a 1-pixel image)
            return index, None, label, f"{type(exc).__name__}: {exc}"


def collate(items: Sequence[tuple[int, Tensor | None, int, str]]) -> Batch:
    good = [(i, x, y) for i, x, y, _ in items if x is not None]
    bad = [(i, " ".join(reason.split())) for i, x, _, reason in items if x is None]
    images = torch.stack([x for _, x, _ in good]) if good else torch.empty(0)
    return Batch([i for i, _, _ in good], images, [y for _, _, y in good], bad)
