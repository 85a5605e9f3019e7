"""Low-shot subsets of a train split (the 1% / 10% semi-supervised protocols), and what they need to know.

A subset is given either as a file or as a fraction. The file lists one entry per line: an integer index
into the split (in ``build_dataset`` order), or an image file name as in the ImageNet 1%/10% lists that
SimCLR published (``n01440764_10026.JPEG``), matched against the split's file names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sopvit.config import check
from sopvit.data.datasets import ImageFolderDataset, InMemoryDataset, build_dataset


def check_subset(subset_file: str | None, subset_fraction: float | None) -> None:
    """Validation shared by the low-shot protocols (logreg, finetune)."""
    check(subset_fraction is None or 0 < subset_fraction <= 1, "subset_fraction", "must be in (0, 1]")
    check(
        subset_file is None or subset_fraction is None,
        "subset_file",
        "give subset_file or subset_fraction, not both",
    )


def read_subset_file(path: str, n: int, names: Callable[[], Sequence[str]] | None = None) -> Tensor:
    """Sorted unique indices into a split of ``n`` samples listed by ``path``.

    ``names()`` returns the split's file paths in index order; it is called only when the file lists
    names rather than indices (listing an ImageNet folder takes seconds, so it is never done needlessly).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset_file {path!r} does not exist")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"subset_file {path!r} lists no indices")
    if all(line.lstrip("-").isdigit() for line in lines):
        idx = torch.tensor([int(line) for line in lines], dtype=torch.long)
    else:
        idx = _indices_of_names(path, lines, names)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"subset_file {path!r}: indices must be in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx.unique()


def _indices_of_names(path: str, lines: list[str], names: Callable[[], Sequence[str]] | None) -> Tensor:
    if names is None:
        raise ValueError(
            f"subset_file {path!r}: every line must be an integer index (this data set has no file names), "
            f"got {lines[0]!r}"
        )
    # base names: the published lists name files without their class folder
    position = {os.path.basename(p): i for i, p in enumerate(names())}
    missing = [line for line in lines if os.path.basename(line) not in position]
    if missing:
        raise ValueError(
            f"subset_file {path!r}: {len(missing)} of {len(lines)} names are not in the split, "
            f"e.g. {missing[:3]}"
        )
    return torch.tensor([position[os.path.basename(line)] for line in lines], dtype=torch.long)


def fraction_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the samples (at least one per class)."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        k = max(1, round(fraction * members.numel()))
        keep.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    return torch.cat(keep).sort().values


def low_shot_indices(
    labels: Tensor,
    subset_file: str | None,
    subset_fraction: float | None,
    seed: int,
    names: Callable[[], Sequence[str]] | None = None,
) -> Tensor:
    """Indices of the labelled subset (1%/10% semi-supervised protocol); all indices when neither is set."""
    if subset_file is not None:
        return read_subset_file(subset_file, labels.numel(), names)
    if subset_fraction is not None:
        return fraction_subset(labels, subset_fraction, seed)
    return torch.arange(labels.numel())


def dataset_labels(ds: Dataset[dict[str, Any]]) -> Tensor:
    """int64 labels of a ``build_dataset`` result, read without decoding any image."""
    if isinstance(ds, InMemoryDataset):
        return ds.labels
    if isinstance(ds, ImageFolderDataset):
        return torch.as_tensor(ds.labels, dtype=torch.int64)
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    raise ValueError(f"dataset: cannot read labels of {type(ds).__name__}")


def dataset_paths(ds: Dataset[dict[str, Any]]) -> list[str]:
    """Image file paths of a ``build_dataset`` result in index order (folders only)."""
    if isinstance(ds, ImageFolderDataset):
        return list(ds.paths)
    if isinstance(ds, Subset):
        paths = dataset_paths(ds.dataset)
        return [paths[i] for i in ds.indices]
    raise ValueError(f"dataset: {type(ds).__name__} has no file names; list integer indices instead")


def split_paths(dataset: str, path: str | None, split: str, limit: int | None) -> Callable[[], list[str]]:
    """Deferred ``dataset_paths`` of a split, for ``read_subset_file``'s ``names``."""
    return lambda: dataset_paths(build_dataset(dataset, path, split, limit=limit))
