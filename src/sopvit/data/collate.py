"""Batch collation for the per-sample multi-crop path, with iBOT masks drawn in the workers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sopvit.data.masking import BlockMaskGenerator

__all__ = ["MultiCropCollate", "mask_grid"]


def mask_grid(global_size: int, patch_size: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of a square global crop, as a stride-``patch_size`` patch embedding sees it."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if global_size < patch_size:
        raise ValueError(f"global_size ({global_size}) must be >= patch_size ({patch_size})")
    side = global_size // patch_size
    return side, side


class MultiCropCollate:
    """Collates ``{"image": [crop, ...], "index", "label", "skipped"}`` samples into a batch.

    Args:
        mask_generator: draws the masks of the global crops; its grid must be the global crops'
            patch grid (see ``mask_grid``). ``ratio=0.0`` gives all-False masks.
        n_globals: number of leading crops that are global (masked) crops.

    Returns a dict:
        ``crops``: list over crop positions of float ``(B, C, h, w)`` tensors, globals first.
        ``masks``: bool ``(n_globals * B, gh, gw)`` ordered ``[global1 batch; global2 batch]``,
        i.e. row ``g * B + b`` is sample ``b``'s mask for global crop ``g``, matching
        ``torch.cat(crops[:n_globals])``. True = masked patch.
        ``index``: int64 ``(B,)`` indices actually loaded; ``label``: int64 ``(B,)`` (-1 if
        unlabelled); ``skipped``: int, number of bad files skipped for this batch.

    Masks use torch's global RNG, which DataLoader seeds per worker; a generator stored here
    would be copied into every worker with the same state and repeat the same masks.
    """

    def __init__(self, mask_generator: BlockMaskGenerator, n_globals: int = 2) -> None:
        if not isinstance(mask_generator, BlockMaskGenerator):
            raise TypeError(
                f"mask_generator must be a BlockMaskGenerator, got {type(mask_generator).__name__}"
            )
        if n_globals < 1:
            raise ValueError(f"n_globals must be >= 1, got {n_globals}")
        self.mask_generator = mask_generator
        self.n_globals = n_globals

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mask_generator!r}, n_globals={self.n_globals})"

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("samples must not be empty")
        n_crops = self._n_crops(samples[0])
        for i, sample in enumerate(samples):
            if self._n_crops(sample) != n_crops:
                raise ValueError(f"sample {i} has {self._n_crops(sample)} crops, sample 0 has {n_crops}")
        crops = [torch.stack([s["image"][c] for s in samples]) for c in range(n_crops)]
        batch = len(samples)
        masks = self.mask_generator.sample(self.n_globals * batch)
        return {
            "crops": crops,
            "masks": masks,
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
            "label": torch.tensor([int(s.get("label", -1)) for s in samples], dtype=torch.int64),
            "skipped": sum(int(s.get("skipped", 0)) for s in samples),
        }

    def _n_crops(self, sample: dict[str, Any]) -> int:
        image = sample.get("image")
        if not isinstance(image, (list, tuple)) or not all(isinstance(c, Tensor) for c in image):
            raise TypeError("sample['image'] must be a list of crop tensors (use MultiCropTransform)")
        if len(image) < self.n_globals:
            raise ValueError(f"sample has {len(image)} crops, fewer than n_globals={self.n_globals}")
        return len(image)
