"""The ``data:`` section of a pre-training config: which images, which crops and masks, made where."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from sopvit.config.coerce import check
from sopvit.data.transforms import MultiCropSpec

DatasetName = Literal["folder", "imagenet", "shards", "fashion_mnist", "cifar10", "cifar100"]
AugmentOn = Literal["workers", "device"]


@dataclass
class DataConfig:
    RENAMED: ClassVar[dict[str, str]] = {
        "batched_augment": "write data.augment_on: device (was batched_augment: true) or workers (false)"
    }
    dataset: DatasetName = "folder"
    path: str | None = None  # folder/imagenet/shards: required; others: where to find or download them
    # The crop fields are MultiCropSpec's: their defaults and checks are defined there, once.
    in_chans: int = MultiCropSpec.in_chans
    global_size: int = MultiCropSpec.global_size
    local_size: int = MultiCropSpec.local_size
    n_locals: int = MultiCropSpec.n_locals
    global_scale: tuple[float, float] = MultiCropSpec.global_scale
    local_scale: tuple[float, float] = MultiCropSpec.local_scale
    blur_sigma: tuple[float, float] = MultiCropSpec.blur_sigma  # in pixels (small images: less)
    mask_ratio: tuple[float, float] = (0.3, 0.3)  # iBOT's mix: (0.1, 0.5) with mask_prob 0.5
    mask_prob: float = 1.0
    # workers: DataLoader workers decode and augment each image (the reference path).
    # device: workers only read (files: bytes); decoding, crops, photometric ops and masks run in batches
    # on the training device (the CPU when it trains on the CPU).
    augment_on: AugmentOn = "workers"
    num_workers: int = 8
    limit: int | None = None  # use only the first N images (smoke tests)

    def crop_spec(self) -> MultiCropSpec:
        """The multi-crop augmentation these fields describe (photometric settings: iBOT's)."""
        return MultiCropSpec(**{name: getattr(self, name) for name in _CROP_FIELDS})

    def validate(self) -> None:
        self.crop_spec()
        check(self.local_size <= self.global_size, "local_size", "must be <= global_size")
        lo, hi = self.mask_ratio
        check(0.0 <= lo <= hi <= 1.0, "mask_ratio", f"must be an interval within [0, 1], got ({lo}, {hi})")
        check(0.0 <= self.mask_prob <= 1.0, "mask_prob", "must be in [0, 1]")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 or null")
        what = "tar shards" if self.dataset == "shards" else "image folder"
        check(
            self.path is not None or self.dataset not in ("folder", "imagenet", "shards"),
            "path",
            f"is required for dataset '{self.dataset}' (the {what} to pre-train on)",
        )


# The crop fields of DataConfig are MultiCropSpec's own (the names both have): crop_spec() hands them over.
_CROP_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(DataConfig)
    if f.name in {g.name for g in dataclasses.fields(MultiCropSpec)}
)
