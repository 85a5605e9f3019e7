"""Settings shared by the protocols that fine-tune a backbone on labels (finetune, semisup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sopvit.config import check
from sopvit.data.transforms import INTERPOLATIONS, TimmRandAugment
from sopvit.eval.cache import EvalDataConfig
from sopvit.eval.subsets import check_subset


@dataclass
class SupervisedRecipe(EvalDataConfig):
    """DeiT/BEiT-style supervised training: schedule, regularisation, augmentation, labelled subset.

    Defaults are BEiT's ``run_class_finetuning.py`` as iBOT ran it; each protocol restates what differs.
    """

    epochs: int = 10
    warmup_epochs: float = 1.0
    train_batch_size: int = 64  # per process
    lr: float = 4e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    drop_path: float = 0.1  # stochastic depth, linear in depth up to this rate
    mixup: float = 0.8  # mixup alpha; 0 with cutmix 0 turns mixing off
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment string (BEiT's --aa); None: off
    reprob: float = 0.25  # random erasing probability (timm RandomErasing, 'pixel' mode, one box); 0: off
    train_interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # the random-resized crop's resize
    eval_interpolation: Literal["bicubic", "bilinear"] = "bilinear"
    crop_scale_min: float = 0.08
    eval_every: int = 1  # evaluate after every N epochs (and always after the last); best and last reported
    num_workers: int = 2  # does not change the numbers (views are seeded per image)
    subset_file: str | None = None  # low-shot: indices or file names, one per line (SimCLR's 1% list)
    subset_fraction: float | None = None  # low-shot: class-balanced fraction drawn with `seed`
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", "must be in [0, epochs]")
        check(self.train_batch_size >= 2, "train_batch_size", "must be >= 2 (mixup pairs samples)")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.min_lr >= 0, "min_lr", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        check(self.mixup >= 0, "mixup", "must be >= 0")
        check(self.cutmix >= 0, "cutmix", "must be >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        if self.auto_augment is not None:
            try:
                TimmRandAugment(self.auto_augment, self.image_size, (0.5,) * self.in_chans)
            except ValueError as exc:
                check(False, "auto_augment", str(exc).removeprefix("auto_augment: "))
        check(0 <= self.reprob <= 1, "reprob", "must be in [0, 1]")
        for name in ("train_interpolation", "eval_interpolation"):
            check(getattr(self, name) in INTERPOLATIONS, name, f"must be one of {', '.join(INTERPOLATIONS)}")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", "must be in (0, 1]")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check_subset(self.subset_file, self.subset_fraction)
