"""Semi-supervised 1% / 10%: fine-tune the teacher backbone + the first projection-head layer + a classifier.

This is the protocol behind the paper's 1% / 10% ImageNet numbers: iBOT's
``evaluation/semi_supervised/eval_cls.py``, which SOP's repository copies (``run.sh imagenet_semi_cls``).
It is not the BEiT recipe of ``finetune``: the model keeps the teacher's backbone **and** the first
``head_layers`` layers of its projection head (``--finetune_head_layer 1``: ``Linear(D, hidden)`` + GELU), a
new linear classifier reads their output on the final-normed [CLS] (``--avgpool_patchtokens 0``), and all of
it is trained with DeiT's recipe (``eval_cls.py`` started as DeiT's ``main.py``): AdamW, no layer decay,
1000 epochs at lr 5e-6 per 512 images, mixup / cutmix, RandAugment, random erasing, label smoothing and
repeated augmentation. The labelled subset is SimCLRv2's list (``subset_file``) or a class-balanced
``subset_fraction``. The reference evaluates on the validation set after every epoch and prints the best
top-1 ("Max accuracy"); ``semisup_best_top1`` is that number, ``semisup_top1`` the last epoch's.

Not reproduced: the model EMA the reference keeps (it is never evaluated), its per-epoch lr steps (per step
here), and its rounding of an epoch down to a multiple of 256 images.

The protocol needs the projection head, so ``sopvit eval semisup`` loads the teacher :class:`Encoder` of a
run directory (the registry's ``needs_head``); exports hold the backbone only. Under torchrun the model is
wrapped in DistributedDataParallel, ``train_batch_size`` is per process and the test set is sharded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from sopvit.config import check
from sopvit.data.seeding import SeededSamples, mix_seed
from sopvit.device import resolve_device
from sopvit.distributed import rank, world_size
from sopvit.eval.cache import check_in_chans
from sopvit.eval.finetune_model import set_drop_path
from sopvit.eval.registry import register
from sopvit.eval.semisup_model import SemisupClassifier, param_groups
from sopvit.eval.supervised import (
    SupervisedRecipe,
    evaluate,
    labelled_splits,
    rank_mixing,
    report,
    test_loader,
    train_epoch,
)
from sopvit.models import Encoder
from sopvit.optim.schedules import cosine

# Sources: "README" is iBOT's evaluation/README.md, semi-supervised section (the command the paper's numbers
# come from: vit_small, 8 GPUs, --epochs 1000 --lr 5e-6 --finetune_head_layer 1, SimCLRv2 1% / 10% splits);
# "default" is the argparse default of evaluation/semi_supervised/eval_cls.py (iBOT's and SOP's copies agree),
# which the README command leaves as it is.


@dataclass
class SemisupConfig(SupervisedRecipe):
    head_layers: int = 1  # projection-head layers kept, each Linear + GELU; README --finetune_head_layer 1
    epochs: int = 1000  # README --epochs 1000
    warmup_epochs: float = 5.0  # default --warmup-epochs 5
    train_batch_size: int = 128  # per process; default --batch-size 128 (x 8 processes in run.sh)
    lr: float = 5e-6  # README --lr 5e-6, per 512 images: the applied peak is lr * global batch / 512
    warmup_lr: float = 1e-6  # default --warmup-lr: the warm-up starts here
    # default --min-lr 1e-5: as high as the applied peak at batch 1024, so the lr stays flat after warm-up
    min_lr: float = 1e-5
    weight_decay: float = 0.05  # default --weight-decay; not on biases and norms (timm's rule)
    drop_path: float = 0.1  # default --drop-path 0.1, linear in depth
    mixup: float = 0.8  # default --mixup; 0 with cutmix 0 turns mixing off
    cutmix: float = 1.0  # default --cutmix
    label_smoothing: float = 0.1  # default --smoothing
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # default --aa (timm RandAugment string); None: off
    reprob: float = 0.25  # default --reprob: timm random erasing, one box (--recount 1) of pixel noise
    train_interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # default --train-interpolation
    eval_interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # eval_cls.py: Resize(interpolation=3)
    crop_scale_min: float = 0.08  # timm create_transform's RandomResizedCrop scale (0.08, 1)
    repeated_aug: int = 3  # default --repeated-aug (DeiT's RASampler: 3 views per image); 1 turns it off
    eval_every: int = 1  # evaluate after every N epochs (and after the last), as the reference: every epoch
    num_workers: int = 2  # reference 10 (--num_workers); does not change the numbers
    subset_file: str | None = None  # SimCLRv2's 1percent.txt / 10percent.txt (file names), or indices
    subset_fraction: float | None = None  # class-balanced fraction drawn with `seed` (no list at hand)
    seed: int = 0  # default --seed 0

    def validate(self) -> None:
        super().validate()
        check(self.head_layers >= 0, "head_layers", "must be >= 0 (0: backbone + classifier only)")
        check(self.warmup_lr >= 0, "warmup_lr", "must be >= 0")
        check(self.repeated_aug >= 1, "repeated_aug", "must be >= 1 (1: every image once per epoch)")


def lr_at(step: int, total: int, warmup: int, peak: float, start: float, floor: float) -> float:
    """Linear warm-up from ``start`` to ``peak`` in ``warmup`` steps, then cosine to ``floor``."""
    return cosine(step, total, peak, floor, warmup, warmup_start=start)


class RepeatedViews(Dataset[Any]):
    """Index ``i * repeats + k`` is image ``i``: under :class:`SeededSamples` each copy gets its own views."""

    def __init__(self, dataset: Dataset[Any], repeats: int) -> None:
        self.dataset, self.repeats = dataset, repeats

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset)) * self.repeats

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index // self.repeats]


class RepeatedAugSampler(Sampler[int]):
    """DeiT's repeated augmentation over :class:`RepeatedViews` of ``n`` images: each epoch shuffles the
    images, lists each ``repeats`` times in a row, deals the list to the ranks in turn and keeps
    ``n // world`` indices per rank, so an epoch costs as many samples as without repetition.
    ``repeats`` 1 is a plain shuffle (sharded over the ranks, the remainder dropped)."""

    def __init__(self, n: int, repeats: int, seed: int, world: int, rank: int) -> None:
        self.n, self.repeats, self.seed, self.world, self.rank = n, repeats, seed, world, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen)
        copies = (order[:, None] * self.repeats + torch.arange(self.repeats)).flatten()
        return iter(copies[self.rank :: self.world][: len(self)].tolist())


@register(
    "semisup",
    SemisupConfig,
    "1%/10% semi-supervised: backbone + projection-head layer 1 + classifier, DeiT-style (needs a run)",
    needs_head=True,
)
def run(encoder: Encoder, cfg: SemisupConfig) -> dict[str, float]:
    cfg.validate()
    if encoder.backbone.kind != "vit":
        raise ValueError(
            f"backbone: semi-supervised fine-tuning supports ViTs, got {encoder.backbone.kind!r}"
        )
    check_in_chans(encoder.backbone, cfg.in_chans)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    splits = labelled_splits(cfg)
    subset = splits.subset
    # each view depends on (seed, epoch, image, copy) alone, not on num_workers or the rank count
    seeded = SeededSamples(RepeatedViews(Subset(splits.train, subset.tolist()), cfg.repeated_aug), cfg.seed)
    world = world_size()
    sampler = RepeatedAugSampler(subset.numel(), cfg.repeated_aug, cfg.seed, world, rank())
    batch = min(cfg.train_batch_size, len(sampler))
    if batch < 1:
        raise ValueError(f"subset: {subset.numel()} training images cannot feed {world} processes")
    train_loader: DataLoader[dict[str, Any]] = DataLoader(
        seeded, batch_size=batch, sampler=sampler, drop_last=True, num_workers=cfg.num_workers
    )
    tests = test_loader(splits.test, cfg)

    model = SemisupClassifier(encoder, cfg.head_layers, splits.n_classes)
    set_drop_path(model.backbone, cfg.drop_path)
    model = model.to(device)
    ids = [device.index] if device.type == "cuda" else None
    trained = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    mixer, criterion = rank_mixing(cfg, splits.n_classes, batch)
    peak = cfg.lr * batch * world / 512  # the reference's linear scaling rule, on the global batch
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    top1s: dict[int, float] = {}  # epoch -> top-1
    step = 0
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        seeded.set_epoch(epoch)
        step = train_epoch(
            trained,
            train_loader,
            opt,
            mixer,
            criterion,
            lambda s: lr_at(s, total, warmup, peak, cfg.warmup_lr, cfg.min_lr),
            step,
            device,
        )
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            top1s[epoch + 1] = evaluate(model, tests, device)
    # the best is what the reference prints as "Max accuracy"
    return report("semisup", top1s, cfg.epochs, subset.numel())
