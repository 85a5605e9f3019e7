"""Batched image decoding on the training device: workers only read file bytes, the main process decodes.

``FileBytesDataset`` (in DataLoader workers) returns each file's raw bytes; ``BatchDecoder`` (in the main
process) decodes a batch of them with one ``torchvision.io.decode_jpeg`` call on the training device
(nvJPEG on CUDA, libjpeg on CPU) and gives the same images, indices and skip counts as the per-sample
``ImageFolderDataset`` would: non-JPEGs, incomplete JPEGs and JPEGs the device decoder refuses are decoded
by the very same PIL code (``decode_image``) on the CPU, so a file is bad exactly when PIL says so;
CMYK JPEGs are decoded by libjpeg on the CPU (its conversion is PIL's). EXIF orientation is applied on
both paths.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from sopvit.data.image_folder import ImageFolderDataset, decode_image

__all__ = ["BatchDecoder", "ByteSource", "Decoded", "FileBytesDataset"]

# in_chans -> (PIL mode of the per-sample path, torchvision mode of the device decoder)
_MODES = {1: ("L", ImageReadMode.GRAY), 3: ("RGB", ImageReadMode.RGB)}
_SOI = [0xFF, 0xD8, 0xFF]
_EOI = [0xFF, 0xD9]
_EXIF_ORIENTATION = 0x0112

# Paths already warned about in this process (the message is the one ImageFolderDataset gives).
_warned: set[str] = set()


class ByteSource(Protocol):
    """A source of encoded images other than a folder's files (``sopvit.data.shards.ShardDataset``)."""

    root: str
    paths: Sequence[str]  # each item's identity in warnings
    labels: Sequence[int]

    def read_bytes(self, index: int) -> np.ndarray: ...


class FileBytesDataset(Dataset[dict[str, Any]]):
    """The images of an ``ImageFolderDataset`` (or a ``ByteSource``) as raw bytes, to decode in batches.

    ``__getitem__(i)`` returns ``{"data": uint8 tensor (num_bytes,), "index": i, "label": int}``; a file
    that cannot be read gives an empty ``data`` (the decoder then counts it as bad).
    """

    def __init__(self, folder: ImageFolderDataset | ByteSource) -> None:
        self.root = folder.root
        self.paths: Sequence[str] = folder.paths
        self.labels: Sequence[int] = folder.labels
        # A folder's item is a whole file; a source that packs many images in a file says how to read one.
        self._read: Callable[[int], np.ndarray] | None = getattr(folder, "read_bytes", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        try:
            raw = self._read(index) if self._read else np.fromfile(self.paths[index], dtype=np.uint8)
            data = torch.from_numpy(raw)
        except OSError:
            data = torch.empty(0, dtype=torch.uint8)
        return {"data": data, "index": index, "label": self.labels[index]}


@dataclass(frozen=True)
class Decoded:
    """A decoded batch of B items.

    images: B uint8 tensors (in_chans, H_i, W_i) on the device, upright per EXIF; sizes differ.
    indices: (B,) int64, the dataset index actually decoded for each item (a bad file's replacement).
    labels: (B,) int64, the labels of ``indices``.
    skipped: bad files hit, counted as ``ImageFolderDataset.__getitem__`` counts them.
    cpu_fallbacks: images of ``images`` decoded by PIL on the CPU (not JPEG, or refused by the device).
    """

    images: list[Tensor]
    indices: Tensor
    labels: Tensor
    skipped: int
    cpu_fallbacks: int


def _orient(img: Tensor, orientation: int) -> Tensor:
    """``PIL.ImageOps.exif_transpose`` on a (C, H, W) tensor; values other than 2..8 leave it as is."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1).contiguous()
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


def _jpeg_plan(data: Tensor, device: torch.device) -> tuple[int, torch.device] | None:
    """(EXIF orientation, device to decode on) for a JPEG torchvision may decode, or None to leave the
    file to PIL.

    Only complete JPEGs (ending in EOI) go to torchvision, so a truncated one always gets PIL's verdict
    whatever the device decoder would do with it; CMYK/YCCK ones are decoded by libjpeg on the CPU, whose
    conversion is PIL's, as nvJPEG's is not known to be. Parsing the header with PIL also gives PIL's bomb
    refusal and exactly the orientation ``exif_transpose`` uses (EXIF, else XMP), which nvJPEG ignores.
    """
    if data.numel() < 5 or data[:3].tolist() != _SOI or data[-2:].tolist() != _EOI:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                on = device if img.mode in ("L", "RGB") else torch.device("cpu")
                return int(img.getexif().get(_EXIF_ORIENTATION, 1)), on
    # Any header defect: PIL's full decode then gives the verdict and the reason.
    except Exception:
        return None


def _decode_on_device(datas: list[Tensor], mode: ImageReadMode, device: torch.device) -> list[Tensor | None]:
    """Decodes (num_bytes,) uint8 CPU tensors to (C, H, W) on ``device``; None where the decoder refuses."""
    if not datas:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 warns on every call that its image io moves to TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            out = decode_jpeg(datas, mode=mode, device=device)
            return list(out) if isinstance(out, list) else [out]
        # The batched call returns nothing when any stream fails: retry one by one to isolate it.
        except Exception:
            pass
        results: list[Tensor | None] = []
        for data in datas:
            try:
                out = decode_jpeg(data, mode=mode, device=device)
                results.append(out if isinstance(out, Tensor) else out[0])
            except Exception:
                results.append(None)
        return results


class BatchDecoder:
    """Decodes batches of ``FileBytesDataset`` items on the training device.

    Bad files are remembered (by path) and warned about once per process; an item whose file is bad is
    replaced by the next readable index ``(i + 1) % n, (i + 2) % n, ...``, read synchronously from the
    dataset, exactly as ``ImageFolderDataset.__getitem__`` does.
    """

    def __init__(self) -> None:
        self._bad: dict[str, str] = {}

    def __call__(
        self,
        items: Sequence[Mapping[str, Any]],
        dataset: FileBytesDataset,
        device: torch.device,
        in_chans: int,
    ) -> Decoded:
        if in_chans not in _MODES:
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        indices = [int(item["index"]) for item in items]
        datas = [item["data"] for item in items]
        plans = [
            None if dataset.paths[i] in self._bad else _jpeg_plan(d, device)
            for i, d in zip(indices, datas, strict=True)
        ]
        images: list[Tensor | None] = [None] * len(items)
        for on in {plan[1] for plan in plans if plan is not None}:
            group = [k for k, plan in enumerate(plans) if plan is not None and plan[1] == on]
            decoded = _decode_on_device([datas[k] for k in group], _MODES[in_chans][1], on)
            for k, img in zip(group, decoded, strict=True):
                plan = plans[k]
                if img is not None and plan is not None:
                    images[k] = _orient(img, plan[0]).to(device)
        skipped = fallbacks = 0
        n = len(dataset)
        for k in range(len(items)):
            if images[k] is None:
                images[k] = self._pil(datas[k], dataset.paths[indices[k]], in_chans, device)
                fallbacks += images[k] is not None
            for _ in range(n - 1):
                if images[k] is not None:
                    break
                skipped += 1
                indices[k] = (indices[k] + 1) % n
                images[k], pil = self._decode_one(dataset, indices[k], in_chans, device)
                fallbacks += pil
            if images[k] is None:
                raise RuntimeError(f"all {n} image files under {dataset.root!r} are unreadable")
        return Decoded(
            images=[img for img in images if img is not None],
            indices=torch.tensor(indices, dtype=torch.int64),
            labels=torch.tensor([dataset.labels[i] for i in indices], dtype=torch.int64),
            skipped=skipped,
            cpu_fallbacks=fallbacks,
        )

    def _decode_one(
        self, dataset: FileBytesDataset, index: int, in_chans: int, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """(image or None if bad, whether PIL decoded it) for one replacement index."""
        path = dataset.paths[index]
        if path in self._bad:
            return None, False
        data = dataset[index]["data"]
        plan = _jpeg_plan(data, device)
        if plan is not None:
            img = _decode_on_device([data], _MODES[in_chans][1], plan[1])[0]
            if img is not None:
                return _orient(img, plan[0]).to(device), False
        img = self._pil(data, path, in_chans, device)
        return img, img is not None

    def _pil(self, data: Tensor, path: str, in_chans: int, device: torch.device) -> Tensor | None:
        """The per-sample path's PIL decode of ``data`` as (in_chans, H, W) on ``device``; None if bad."""
        if path in self._bad:
            return None
        try:
            if data.numel() == 0:
                raise OSError("no bytes: the file is empty or could not be read")
            img = decode_image(io.BytesIO(data.numpy().tobytes()), _MODES[in_chans][0])
        # Same rule as ImageFolderDataset: any failure to decode means "bad file".
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._bad[path] = reason
            if path not in _warned:
                _warned.add(path)
                warnings.warn(f"skipping unreadable image {path!r} ({reason})", RuntimeWarning, stacklevel=4)
            return None
        return pil_to_tensor(img).to(device)
