"""End-to-end fine-tuning of the backbone + a linear classifier on [CLS] (BEiT recipe as iBOT/SOP ran it).

The reference is BEiT's ``run_class_finetuning.py`` as iBOT's ``evaluation/classification_layer_decay/``
(and SOP's fork of it) carries it, with iBOT's ``run.sh`` flags: AdamW, layer-wise lr decay, weight decay
0.05, drop path 0.1, mixup 0.8, cutmix 1.0, label smoothing 0.1, timm RandAugment 'rand-m9-mstd0.5-inc1',
random erasing 0.25 ('pixel', one box), bicubic random-resized crops, a bilinear 256/224 resize and centre
crop for evaluation, a linear warm-up then a cosine lr, the lr applied as given (not rescaled with the
batch), the test set evaluated after every epoch and the best epoch reported. Per architecture (iBOT's
evaluation README): ViT-S 200 epochs, layer decay 0.75; ViT-B 100, 0.65; ViT-L 50, 0.75. The defaults below
keep that regularisation with a short schedule (10 epochs, 1 warm-up, batch 64); ``configs/eval/`` holds the
ImageNet recipes and a Fashion-MNIST one, where small crops, RandAugment and mixing cost accuracy on 28 px
images. ``subset_file`` / ``subset_fraction`` fine-tune on a labelled subset of train with this recipe
(iBOT's own 1%/10% numbers come from another script: the ``semisup`` protocol).

Under torchrun the model is wrapped in DistributedDataParallel: ``train_batch_size`` is per process (the
lr is not rescaled: set it for the global batch) and the test set is sharded for evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from sopvit.config import check
from sopvit.data.datasets import build_dataset
from sopvit.data.seeding import SeededSamples
from sopvit.data.transforms import EvalTransform, SupervisedTrainTransform
from sopvit.device import autocast, resolve_device
from sopvit.distributed import all_gather_rows, all_reduce_min, rank, shard, world_size
from sopvit.eval.cache import check_in_chans
from sopvit.eval.finetune_model import Classifier, param_groups, set_drop_path
from sopvit.eval.registry import register
from sopvit.eval.subsets import dataset_labels, low_shot_indices, split_paths
from sopvit.eval.supervised import SupervisedRecipe
from sopvit.models import Backbone
from sopvit.train.schedules import cosine


@dataclass
class FinetuneConfig(SupervisedRecipe):
    epochs: int = 10  # paper: 100
    warmup_epochs: float = 1.0  # paper: 20 (BEiT ViT-B)
    train_batch_size: int = 64  # per process; paper: 1024 in all
    # the peak lr, applied as given: BEiT's run_class_finetuning.py does not rescale it with the batch
    # (iBOT's default 4e-3 is for its global batch of 8 x 128 = 1024); set it for train_batch_size x ranks
    lr: float = 4e-3
    layer_decay: float = 0.65  # block i (0-based) gets lr * decay ** (depth - i); embeddings the smallest
    weight_decay: float = 0.05  # not on biases, norms, position embeddings or tokens
    eval_interpolation: Literal["bicubic", "bilinear"] = "bilinear"  # BEiT's eval Resize(interpolation=2)

    def validate(self) -> None:
        super().validate()
        check(self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        check(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Warm-up from ``peak / warmup`` (the first step already learns), then the shared cosine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step, total, peak, floor, warmup)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[dict[str, Any]], device: torch.device) -> float:
    model.eval()
    bf16 = autocast(device)
    correct = seen = 0
    with bf16:
        for batch in loader:
            logits = model(batch["image"].to(device, non_blocking=True))
            correct += int((logits.argmax(-1).cpu() == torch.as_tensor(batch["label"])).sum())
            seen += len(batch["label"])
    # every rank evaluated its shard of the test set
    totals = all_gather_rows(torch.tensor([[correct, seen]], device=device)).sum(0)
    return 100.0 * float(totals[0]) / max(float(totals[1]), 1.0)


def _native_resize(cfg: FinetuneConfig) -> int | None:
    return cfg.image_size if cfg.dataset in ("fashion_mnist", "cifar10", "cifar100") else None


@register("finetune", FinetuneConfig, "full fine-tuning (BEiT recipe): last and best-epoch top-1")
def run(backbone: Backbone, cfg: FinetuneConfig) -> dict[str, float]:
    cfg.validate()
    if backbone.kind != "vit":
        raise ValueError(f"backbone: fine-tuning supports ViT backbones, got {backbone.kind!r}")
    check_in_chans(backbone, cfg.in_chans)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_tf = SupervisedTrainTransform(
        cfg.image_size,
        cfg.in_chans,
        crop_scale=(cfg.crop_scale_min, 1.0),
        auto_augment=cfg.auto_augment,
        reprob=cfg.reprob,
        interpolation=cfg.train_interpolation,
    )
    train_ds = build_dataset(cfg.dataset, cfg.path, cfg.train_split, transform=train_tf, limit=cfg.limit)
    # each image's views depend on (seed, epoch, image) alone, not on num_workers or the rank count
    seeded = SeededSamples(train_ds, cfg.seed)
    test_ds = build_dataset(
        cfg.dataset,
        cfg.path,
        cfg.test_split,
        # Small in-memory sets are evaluated at their native size (no 256/224 centre crop), as k-NN and
        # linear do: the crop would zoom 28 px images by 8% and shift them away from the training views.
        transform=EvalTransform(
            cfg.image_size,
            resize=_native_resize(cfg),
            in_chans=cfg.in_chans,
            interpolation=cfg.eval_interpolation,
        ),
        limit=cfg.limit,
    )
    labels = dataset_labels(train_ds)
    n_classes = int(max(labels.max(), dataset_labels(test_ds).max())) + 1
    names = split_paths(cfg.dataset, cfg.path, cfg.train_split, cfg.limit)
    subset = low_shot_indices(labels, cfg.subset_file, cfg.subset_fraction, cfg.seed, names)
    train_sub = Subset(seeded, subset.tolist())
    world = world_size()
    # drop_last keeps every batch even-sized (timm Mixup pairs samples) unless the subset is tiny
    batch = min(cfg.train_batch_size, len(train_sub) // world)
    if batch < 1:
        raise ValueError(f"subset: {len(train_sub)} training images cannot feed {world} processes")
    sampler: DistributedSampler[dict[str, Any]] | None = None
    if world > 1:
        sampler = DistributedSampler(train_sub, shuffle=True, seed=cfg.seed, drop_last=True)
    train_loader: DataLoader[dict[str, Any]] = DataLoader(
        train_sub,
        batch_size=batch,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
    )
    test_loader: DataLoader[dict[str, Any]] = DataLoader(
        Subset(test_ds, list(shard(len(cast(Sized, test_ds))))),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )

    # never touch the caller's weights: all changes (drop path, training) happen on a copy
    net = copy.deepcopy(backbone).requires_grad_(True)  # a pre-training teacher arrives frozen
    net.mask_token.requires_grad_(False)  # masked modelling only: DDP must not wait for its gradient
    set_drop_path(net, cfg.drop_path)
    model = Classifier(net, n_classes).to(device)
    ids = [device.index] if device.type == "cuda" else None
    trained = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    torch.manual_seed(cfg.seed + rank())  # same head init everywhere, own mixing and drop-path draws
    # timm's Mixup draws lambda, the mixup/cutmix switch and the CutMix box from numpy's global RNG
    np.random.seed((cfg.seed + rank()) % 2**32)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    mixer = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=n_classes,
        )
        if mixing
        else None
    )
    if mixer is not None and len(train_sub) < 2:
        raise ValueError("mixup: mixing needs at least 2 training images; set mixup and cutmix to 0")
    # timm's Mixup already smooths its soft targets; without mixing, smoothing is the loss's job
    smooth = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    criterion: nn.Module = SoftTargetCrossEntropy() if mixing else smooth
    peak = cfg.lr  # as BEiT's script: no rescaling with the batch
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    bf16 = autocast(device)
    step = 0
    top1s: dict[int, float] = {}  # epoch (1-based) -> test top-1
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        seeded.set_epoch(epoch)
        trained.train()
        for b in train_loader:
            x, y = b["image"].to(device, non_blocking=True), torch.as_tensor(b["label"]).to(device)
            if mixer is not None:
                if x.shape[0] % 2:  # only when a tiny subset is a single odd batch
                    x, y = x[:-1], y[:-1]
                x, target = mixer(x, y)
            else:
                target = y
            lr = lr_at(step, total, warmup, peak, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with bf16:
                loss = criterion(trained(x).float(), target)
            # decided together: one rank raising alone would leave the others waiting in backward
            if not bool(all_reduce_min(torch.isfinite(loss.detach()).float())):
                raise ValueError(f"lr: fine-tuning loss became {float(loss)} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            # the test loader draws its seed from torch's RNG: evaluating must not change the training
            with torch.random.fork_rng(devices=[]):
                top1s[epoch + 1] = evaluate(model, test_loader, device)
    best_epoch = max(top1s, key=lambda e: (top1s[e], -e))  # the first epoch reaching the best, as BEiT's
    return {
        "finetune_top1": top1s[cfg.epochs],  # the last epoch's
        "finetune_best_top1": top1s[best_epoch],
        "finetune_best_epoch": float(best_epoch),
        "finetune_train_size": float(subset.numel()),
    }
