"""Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist, or a torchvision download)."""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_ENV", "load_fashion_mnist", "read_idx"]

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "SOPVIT_FASHION_MNIST"
_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sopvit")
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x0803  # uint8 data, 3 dimensions
_LABELS_MAGIC = 0x0801  # uint8 data, 1 dimension


def read_idx(path: str, magic: int, limit: int | None = None) -> np.ndarray:
    """Reads an uint8 idx file (optionally gzipped) into an array of its declared shape.

    Raises FileNotFoundError if ``path`` is missing and ValueError naming ``path`` if it is not a
    valid idx file with the expected ``magic`` (wrong header, truncated or trailing data, broken
    gzip stream). ``limit`` reads only the first ``limit`` items.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"idx file not found: {path!r}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or int.from_bytes(header, "big") != magic:
                raise ValueError(f"{path!r}: bad idx magic number {header.hex()!r}, expected {magic:08x}")
            ndim = magic & 0xFF
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise ValueError(f"{path!r}: truncated idx header")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            n = dims[0] if limit is None else min(limit, dims[0])
            count = n * math.prod(dims[1:])
            data = f.read(count)
            if len(data) != count:
                raise ValueError(f"{path!r}: truncated idx data ({len(data)} of {count} bytes)")
            if limit is None and f.read(1):
                raise ValueError(f"{path!r}: trailing data after {dims[0]} items")
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path!r}: unreadable or corrupt idx file ({exc})") from exc
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


def _idx_path(folder: str, split: str, kind: str) -> str | None:
    stem = os.path.join(folder, f"{_PREFIX[split]}-{kind}-ubyte")
    for candidate in (stem + ".gz", stem):
        if os.path.isfile(candidate):
            return candidate
    return None


def _resolve_dir(root: str | None, split: str) -> str:
    """Folder holding the idx files: explicit root > env var > Debian path > cache > download."""
    explicit = root if root is not None else os.environ.get(FASHION_MNIST_ENV)
    if explicit is not None:
        for folder in (explicit, os.path.join(explicit, "FashionMNIST", "raw")):
            if _idx_path(folder, split, "images-idx3") and _idx_path(folder, split, "labels-idx1"):
                return folder
        source = "root" if root is not None else f"${FASHION_MNIST_ENV}"
        raise FileNotFoundError(
            f"Fashion-MNIST {split} idx files ({_PREFIX[split]}-images-idx3-ubyte[.gz], "
            f"{_PREFIX[split]}-labels-idx1-ubyte[.gz]) not found in {explicit!r} (from {source})"
        )
    cache_raw = os.path.join(_CACHE_DIR, "FashionMNIST", "raw")
    for folder in (DEFAULT_FASHION_MNIST_DIR, cache_raw):
        if _idx_path(folder, split, "images-idx3") and _idx_path(folder, split, "labels-idx1"):
            return folder
    logger.warning(
        "Fashion-MNIST not found in %s or %s; downloading it with torchvision into %s (set $%s to use "
        "a local copy; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` provides one)",
        DEFAULT_FASHION_MNIST_DIR,
        cache_raw,
        _CACHE_DIR,
        FASHION_MNIST_ENV,
    )
    from torchvision.datasets import FashionMNIST

    FashionMNIST(_CACHE_DIR, train=split == "train", download=True)
    return cache_raw


def load_fashion_mnist(
    split: str = "train", root: str | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    Args:
        split: "train" (N=60000) or "test" (N=10000).
        root: folder with the idx files (gzipped or not, also the torchvision
            ``FashionMNIST/raw`` layout). Defaults to ``$SOPVIT_FASHION_MNIST``, then
            ``/usr/share/datasets/fashion-mnist``, then ``~/.cache/sopvit`` (downloaded if absent).
        limit: keep only the first ``limit`` samples.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    folder = _resolve_dir(root, split)
    images_path = _idx_path(folder, split, "images-idx3")
    labels_path = _idx_path(folder, split, "labels-idx1")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} idx files missing in {folder!r}")
    images = read_idx(images_path, _IMAGES_MAGIC, limit)
    labels = read_idx(labels_path, _LABELS_MAGIC, limit)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path!r}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path!r} has {images.shape[0]} images but {labels_path!r} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{labels_path!r}: label {int(labels.max())} out of range 0..9")
    # np.frombuffer arrays are read-only; copy so torch owns writable memory.
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
