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
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from sopvit.config import check
from sopvit.data.seeding import SeededSamples
from sopvit.device import resolve_device
from sopvit.distributed import world_size
from sopvit.eval.cache import check_in_chans
from sopvit.eval.finetune_model import Classifier, param_groups, set_drop_path
from sopvit.eval.registry import register
from sopvit.eval.supervised import (
    SupervisedRecipe,
    evaluate,
    labelled_splits,
    rank_mixing,
    report,
    test_loader,
    train_epoch,
)
from sopvit.models import Backbone
from sopvit.optim.schedules import cosine


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


@register("finetune", FinetuneConfig, "full fine-tuning (BEiT recipe): last and best-epoch top-1")
def run(backbone: Backbone, cfg: FinetuneConfig) -> dict[str, float]:
    cfg.validate()
    if backbone.kind != "vit":
        raise ValueError(f"backbone: fine-tuning supports ViT backbones, got {backbone.kind!r}")
    check_in_chans(backbone, cfg.in_chans)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    splits = labelled_splits(cfg)
    # each image's views depend on (seed, epoch, image) alone, not on num_workers or the rank count
    seeded = SeededSamples(splits.train, cfg.seed)
    train_sub = Subset(seeded, splits.subset.tolist())
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
    tests = test_loader(splits.test, cfg)

    # never touch the caller's weights: all changes (drop path, training) happen on a copy
    net = copy.deepcopy(backbone).requires_grad_(True)  # a pre-training teacher arrives frozen
    net.mask_token.requires_grad_(False)  # masked modelling only: DDP must not wait for its gradient
    set_drop_path(net, cfg.drop_path)
    model = Classifier(net, splits.n_classes).to(device)
    ids = [device.index] if device.type == "cuda" else None
    trained = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    mixer, criterion = rank_mixing(cfg, splits.n_classes, batch)  # same head init on every rank before it
    peak = cfg.lr  # as BEiT's script: no rescaling with the batch
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    step = 0
    top1s: dict[int, float] = {}  # epoch (1-based) -> test top-1
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        seeded.set_epoch(epoch)
        step = train_epoch(
            trained,
            train_loader,
            opt,
            mixer,
            criterion,
            lambda s: lr_at(s, total, warmup, peak, cfg.min_lr),
            step,
            device,
        )
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            top1s[epoch + 1] = evaluate(model, tests, device)
    return report("finetune", top1s, cfg.epochs, splits.subset.numel())
