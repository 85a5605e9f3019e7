"""Recursive image-folder dataset that survives bad files (corrupt, truncated, unreadable, bombs)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "decode_image", "scan_images"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike[str]) -> list[str]:
    """All image files under ``root`` (recursive, symlinks followed), in sorted, deterministic order.

    Directories are visited once by real path, so symlink cycles and links to already-seen
    folders neither loop nor duplicate files. Returned paths are spelled under ``root``.
    """
    root = os.fspath(root)
    visited: set[str] = set()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in visited)
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f)]
    return found


def decode_image(path: str | BinaryIO, mode: str) -> Image.Image:
    """Opens and fully decodes ``path`` (a file name or a binary file object), upright per its EXIF
    orientation; raises on any defect, including truncation and bombs."""
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat both as bombs.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            # Camera JPEGs store pixels sensor-up and rely on the EXIF tag; the batched decoder
            # (sopvit.data.decode) applies the same tag, so both paths see the same upright image.
            ImageOps.exif_transpose(img, in_place=True)
            return img.convert(mode)


class ImageFolderDataset(Dataset[dict[str, Any]]):
    """Images found recursively under ``root``, optionally labelled by top-level subfolder.

    Args:
        root: folder to scan (symlinks followed safely).
        transform: applied to the decoded PIL image (e.g. ``MultiCropTransform``); without one
            the PIL image itself is returned.
        labelled: ``None`` labels by immediate subfolder (ImageNet layout) when every
            immediate subfolder holds images and ``root`` holds none directly, else -1;
            ``True`` requires that layout; ``False`` always gives -1.
        mode: PIL mode images are converted to ("RGB" or "L").

    ``__getitem__(i)`` returns ``{"image": transform(img), "index": int, "label": int,
    "skipped": int}``. A file that cannot be decoded is skipped: the next index ``(i + 1) % n``
    is tried, ``index`` is the index actually loaded and ``skipped`` the number of bad files hit.
    Each bad path is warned about once per process (so once per DataLoader worker).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        labelled: bool | None = None,
        mode: str = "RGB",
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root!r}")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.transform = transform
        self.mode = mode
        self.paths = scan_images(self.root)
        if not self.paths:
            raise ValueError(
                f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {self.root!r}"
            )
        self.classes: list[str] = []
        self.labels: list[int] = [-1] * len(self.paths)
        if labelled is not False:
            self._assign_labels(required=labelled is True)
        self.unreadable: dict[int, str] = {}

    def _assign_labels(self, required: bool) -> None:
        top_level: list[str] = []
        for path in self.paths:
            parts = Path(os.path.relpath(path, self.root)).parts
            top_level.append(parts[0] if len(parts) > 1 else "")
        # A symlink back to the root (a cycle) is not a class folder.
        root_real = os.path.realpath(self.root)
        subdirs = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and os.path.realpath(e.path) != root_real
        )
        with_images = set(top_level)
        problem = ""
        if "" in with_images:
            problem = "it contains images directly"
        elif not subdirs:
            problem = "it has no subfolders"
        elif missing := [d for d in subdirs if d not in with_images]:
            problem = f"subfolders without images: {missing[:5]}"
        if problem:
            if required:
                raise ValueError(f"cannot label {self.root!r} by class subfolder: {problem}")
            return
        self.classes = subdirs
        class_to_idx = self.class_to_idx
        self.labels = [class_to_idx[name] for name in top_level]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, n={len(self)}, classes={len(self.classes)})"

    def try_load(self, index: int) -> Image.Image | None:
        """Image ``index`` decoded, or None if it cannot be (then ``unreadable[index]`` says why); no
        skipping to the next file, which ``__getitem__`` adds for training."""
        if index in self.unreadable:
            return None
        path = self.paths[index]
        try:
            return decode_image(path, self.mode)
        # PIL plugins signal malformed data with many exception types (OSError, SyntaxError,
        # ValueError, struct.error, IndexError, ...); any failure to decode means "bad file".
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.unreadable[index] = reason
            warnings.warn(f"skipping unreadable image {path!r} ({reason})", RuntimeWarning, stacklevel=3)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        for skipped in range(n):
            current = (index + skipped) % n
            img = self.try_load(current)
            if img is not None:
                image = self.transform(img) if self.transform is not None else img
                return {"image": image, "index": current, "label": self.labels[current], "skipped": skipped}
        raise RuntimeError(f"all {n} image files under {self.root!r} are unreadable")
