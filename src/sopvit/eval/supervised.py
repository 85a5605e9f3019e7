"""What the protocols that fine-tune a backbone on labels (finetune, semisup) share: their settings, the
labelled splits, the per-rank mixing, one training epoch, the evaluation and the reported numbers."""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sopvit.config import check
from sopvit.data.datasets import build_dataset
from sopvit.data.eval_transforms import (
    INTERPOLATIONS,
    EvalTransform,
    SupervisedTrainTransform,
    TimmRandAugment,
)
from sopvit.device import autocast
from sopvit.distributed import all_gather_rows, all_reduce_min, rank, shard
from sopvit.eval.cache import EvalDataConfig
from sopvit.eval.subsets import check_subset, dataset_labels, low_shot_indices, split_paths


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


@dataclass
class LabelledSplits:
    train: Dataset[dict[str, Any]]  # the whole train split, with the recipe's training augmentation
    test: Dataset[dict[str, Any]]
    subset: torch.Tensor  # (n,) indices of the labelled training images (all of them by default)
    n_classes: int


def labelled_splits(cfg: SupervisedRecipe) -> LabelledSplits:
    train = build_dataset(
        cfg.dataset,
        cfg.path,
        cfg.train_split,
        transform=SupervisedTrainTransform(
            cfg.image_size,
            cfg.in_chans,
            crop_scale=(cfg.crop_scale_min, 1.0),
            auto_augment=cfg.auto_augment,
            reprob=cfg.reprob,
            interpolation=cfg.train_interpolation,
        ),
        limit=cfg.limit,
    )
    # Small in-memory sets are evaluated at their native size (no 256/224 centre crop), as k-NN and linear
    # do: the crop would zoom 28 px images by 8% and shift them away from the training views.
    native = cfg.image_size if cfg.dataset in ("fashion_mnist", "cifar10", "cifar100") else None
    eval_tf = EvalTransform(
        cfg.image_size, resize=native, in_chans=cfg.in_chans, interpolation=cfg.eval_interpolation
    )
    test = build_dataset(cfg.dataset, cfg.path, cfg.test_split, transform=eval_tf, limit=cfg.limit)
    labels = dataset_labels(train)
    n_classes = int(max(labels.max(), dataset_labels(test).max())) + 1
    names = split_paths(cfg.dataset, cfg.path, cfg.train_split, cfg.limit)
    subset = low_shot_indices(labels, cfg.subset_file, cfg.subset_fraction, cfg.seed, names)
    return LabelledSplits(train, test, subset, n_classes)


def test_loader(test: Dataset[dict[str, Any]], cfg: SupervisedRecipe) -> DataLoader[dict[str, Any]]:
    """This rank's shard of the test split."""
    shard_ = Subset(test, list(shard(len(cast(Sized, test)))))
    return DataLoader(shard_, batch_size=cfg.batch_size, num_workers=cfg.num_workers)


def rank_mixing(cfg: SupervisedRecipe, n_classes: int, batch: int) -> tuple[Mixup | None, nn.Module]:
    """Seeds this rank's own mixing and drop-path draws; timm's mixer (None without mixing) and the loss."""
    torch.manual_seed(cfg.seed + rank())
    # timm's Mixup draws lambda, the mixup/cutmix switch and the CutMix box from numpy's global RNG
    np.random.seed((cfg.seed + rank()) % 2**32)
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        # without mixing, smoothing is the loss's job (timm's Mixup smooths its soft targets itself)
        return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if batch < 2:
        raise ValueError(
            f"mixup: mixing pairs the images of a batch, and this subset gives batches of {batch} per "
            "process; set mixup and cutmix to 0"
        )
    mixer = Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.label_smoothing,
        num_classes=n_classes,
    )
    return mixer, SoftTargetCrossEntropy()


def train_epoch(
    model: nn.Module,
    loader: DataLoader[dict[str, Any]],
    opt: torch.optim.Optimizer,
    mixer: Mixup | None,
    criterion: nn.Module,
    lr_at: Callable[[int], float],
    step: int,
    device: torch.device,
) -> int:
    """One epoch from global step ``step``; each group's lr is ``lr_at(step)`` times its ``lr_scale`` (layer
    decay; 1 without it). Returns the next step."""
    model.train()
    bf16 = autocast(device)
    for b in loader:
        x, y = b["image"].to(device, non_blocking=True), torch.as_tensor(b["label"]).to(device)
        if mixer is not None:
            if x.shape[0] % 2:  # only when a tiny subset is a single odd batch
                x, y = x[:-1], y[:-1]
            x, target = mixer(x, y)
        else:
            target = y
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        with bf16:
            loss = criterion(model(x).float(), target)
        # decided together: one rank raising alone would leave the others waiting in backward
        if not bool(all_reduce_min(torch.isfinite(loss.detach()).float())):
            raise ValueError(f"lr: fine-tuning loss became {float(loss)} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[dict[str, Any]], device: torch.device) -> float:
    """Top-1 (%) over every rank's shard; torch's RNG is left as it was (the loader draws a seed from it, and
    evaluating must not change the training that follows)."""
    model.eval()
    correct = seen = 0
    with torch.random.fork_rng(devices=[]), autocast(device):
        for batch in loader:
            logits = model(batch["image"].to(device, non_blocking=True))
            correct += int((logits.argmax(-1).cpu() == torch.as_tensor(batch["label"])).sum())
            seen += len(batch["label"])
    totals = all_gather_rows(torch.tensor([[correct, seen]], device=device)).sum(0)
    return 100.0 * float(totals[0]) / max(float(totals[1]), 1.0)


def report(prefix: str, top1s: dict[int, float], last_epoch: int, train_size: int) -> dict[str, float]:
    """The last epoch's top-1, the best one (the first epoch reaching it, as BEiT's and DeiT's scripts) and
    the labelled training set's size."""
    best_epoch = max(top1s, key=lambda e: (top1s[e], -e))
    return {
        f"{prefix}_top1": top1s[last_epoch],
        f"{prefix}_best_top1": top1s[best_epoch],
        f"{prefix}_best_epoch": float(best_epoch),
        f"{prefix}_train_size": float(train_size),
    }
