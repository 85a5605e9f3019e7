"""Linear probing: a sweep of linear heads over frozen, precomputed features, all trained in one pass.

DINO/iBOT probe ViT-S with the [CLS] of the last 4 blocks and ViT-B with [CLS] + mean patch token, and
report the best of a learning-rate sweep. Because the features are frozen they are extracted once
(and cached); every (lr, optimizer, weight decay) head is one slice of a (H, F, C) weight tensor, so
the sweep costs a single batched matmul per step instead of H training runs.

``augment: true`` is DINO's protocol: every epoch sees new random-resized-crop + flip views of the train
images, so the backbone runs once per epoch (sharded over ranks). The default trains on the features
of the unaugmented images, extracted once and cached: ~epochs times cheaper, typically a little lower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from sopvit.config import check
from sopvit.data.seeding import mix_seed
from sopvit.data.transforms import SupervisedTrainTransform
from sopvit.device import resolve_device
from sopvit.eval.cache import (
    EvalDataConfig,
    check_layers,
    extract_dataset_features,
    resolve_layers,
    split_features,
)
from sopvit.eval.registry import register
from sopvit.models import Backbone

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "lars")


@dataclass
class LinearConfig(EvalDataConfig):
    # "lastN": [CLS] of the last N blocks; "cls+avgpool": [CLS] + mean patch token; "auto": the paper's
    # choice for the architecture (ViT-S: last4, ViT-B/L: cls+avgpool)
    layers: str = "auto"
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # per 256 images (x train_batch_size/256)
    weight_decays: tuple[float, ...] = (0.0, 1e-6)
    optimizers: tuple[str, ...] = OPTIMIZERS
    momentum: float = 0.9
    epochs: int = 100
    train_batch_size: int = 1024
    val_fraction: float = 0.0  # >0: pick the head on a held-out part of train; 0: on test (DINO's habit)
    augment: bool = False  # new random crops + flips of train every epoch (DINO); False: precomputed
    crop_scale_min: float = 0.08  # augment: RandomResizedCrop scale range (crop_scale_min, 1)
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_layers(self.layers, allow_auto=True)
        check(len(self.lrs) > 0 and min(self.lrs) > 0, "lrs", "must be non-empty and > 0")
        check(len(self.weight_decays) > 0 and min(self.weight_decays) >= 0, "weight_decays", "must be >= 0")
        check(len(self.optimizers) > 0 and set(self.optimizers) <= set(OPTIMIZERS), "optimizers", "sgd|lars")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.train_batch_size >= 1, "train_batch_size", "must be >= 1")
        check(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", "must be in (0, 1]")
        check(not (self.augment and self.val_fraction > 0), "val_fraction", "must be 0 with augment")


def feature_stats(train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (N, F) -> (F,), (F,) of the train set."""
    return train.mean(0), train.std(0, correction=0).clamp_min(1e-6)


def standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale every feature to zero mean / unit std of the train set (a frozen BatchNorm, without the BN)."""
    mean, std = feature_stats(train)
    return [(t - mean) / std for t in (train, *others)]


def augmented_epochs(backbone: Backbone, cfg: LinearConfig, clean_train: Tensor) -> Callable[[int], Tensor]:
    """``epoch -> (N, F)`` standardised features of fresh random crops + flips of the train split.

    Standardised with the statistics of the unaugmented features so every epoch shares one scale.
    """
    mean, std = feature_stats(clean_train)
    transform = SupervisedTrainTransform(cfg.image_size, cfg.in_chans, 0, 0, (cfg.crop_scale_min, 1.0))
    device = resolve_device(cfg.device)

    def features(epoch: int) -> Tensor:
        x, _ = extract_dataset_features(
            backbone,
            cfg.dataset,
            cfg.path,
            cfg.train_split,
            cfg.image_size,
            cfg.in_chans,
            cfg.batch_size,
            cfg.limit,
            device,
            cfg.layers,
            transform=transform,
            transform_seed=mix_seed(cfg.seed, epoch),  # views of (seed, epoch, image) alone
        )
        return ((x - mean) / std).to(device)

    return features


@torch.no_grad()
def lars_sgd_step(
    w: Tensor, grad: Tensor, buf: Tensor, lr: Tensor, wd: Tensor, momentum: float, is_lars: Tensor
) -> None:
    """In-place momentum step of H stacked heads (dim 0), each with its own lr, wd and optimizer.

    SGD: ``g = grad + wd w``. LARS additionally scales ``g`` by the trust ratio ``||w|| / ||g||`` of
    its head (1 where either norm is 0, e.g. at a zero init). Then ``buf = m buf + g; w -= lr buf``.
    """
    shape = (-1,) + (1,) * (w.ndim - 1)
    g = grad + wd.view(shape) * w
    w_norm = w.flatten(1).norm(dim=1)
    g_norm = g.flatten(1).norm(dim=1)
    trust = torch.where(
        (w_norm > 0) & (g_norm > 0), w_norm / g_norm.clamp_min(1e-12), torch.ones_like(w_norm)
    )
    g = g * torch.where(is_lars, trust, torch.ones_like(trust)).view(shape)
    buf.mul_(momentum).add_(g)
    w.sub_(lr.view(shape) * buf)


@dataclass
class LinearHeads:
    weight: Tensor  # (H, F, C)
    bias: Tensor  # (H, C)
    lr: Tensor  # (H,) base (unscaled) lr of each head
    wd: Tensor  # (H,)
    is_lars: Tensor  # (H,) bool

    @torch.no_grad()
    def accuracies(self, x: Tensor, y: Tensor, chunk: int = 4096) -> Tensor:
        """Top-1 (%) of every head, (H,)."""
        correct = torch.zeros(self.weight.shape[0], dtype=torch.long, device=x.device)
        for s in range(0, x.shape[0], chunk):
            logits = torch.einsum("nf,hfc->hnc", x[s : s + chunk], self.weight) + self.bias[:, None]
            correct += (logits.argmax(-1) == y[s : s + chunk]).sum(1)
        # counts, then float64: 84.48, not float32's 84.4800033569336
        return 100.0 * correct.double() / max(x.shape[0], 1)


def train_linear_heads(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    cfg: LinearConfig,
    epoch_features: Callable[[int], Tensor] | None = None,
) -> LinearHeads:
    """SGD/LARS heads for every (lr, optimizer, wd) of ``cfg``, trained together on (x, y) with cosine lr.

    ``epoch_features(e)``, when given, replaces ``x`` (N, F) in epoch ``e`` (augmented views, same order).
    """
    grid = [(lr, opt, wd) for lr in cfg.lrs for opt in cfg.optimizers for wd in cfg.weight_decays]
    dev = x.device
    # float64 copies so the reported winner is exactly the configured value, not its float32 rounding
    base_lr = torch.tensor([g[0] for g in grid], dtype=torch.float64, device=dev)
    base_wd = torch.tensor([g[2] for g in grid], dtype=torch.float64, device=dev)
    lr = (base_lr * cfg.train_batch_size / 256).float()  # the linear scaling rule
    wd = base_wd.float()
    is_lars = torch.tensor([g[1] == "lars" for g in grid], device=dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    # DINO's init: N(0, 0.01) weights, zero bias; non-zero so LARS's trust ratio is defined from step 1
    w = (torch.randn(len(grid), x.shape[1], n_classes, generator=gen) * 0.01).to(dev)
    b = torch.zeros(len(grid), n_classes, device=dev)
    w_buf, b_buf = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(x.shape[0] / cfg.train_batch_size)
    total = cfg.epochs * steps_per_epoch
    no_wd, no_lars = torch.zeros_like(wd), torch.zeros_like(is_lars)
    step = 0
    for epoch in range(cfg.epochs):
        if epoch_features is not None:
            x = epoch_features(epoch)
        perm = torch.randperm(x.shape[0], generator=gen).to(dev)
        for s in range(0, x.shape[0], cfg.train_batch_size):
            idx = perm[s : s + cfg.train_batch_size]
            xb, yb = x[idx], y[idx]
            w.requires_grad_(True)
            b.requires_grad_(True)
            with torch.enable_grad():
                logits = torch.einsum("nf,hfc->hnc", xb, w) + b[:, None]
                # sum over heads of each head's mean loss: the heads' gradients stay independent
                loss = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(grid)), reduction="sum")
                w_grad, b_grad = torch.autograd.grad(loss / xb.shape[0], (w, b))
            w, b = w.detach(), b.detach()
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            lars_sgd_step(w, w_grad, w_buf, lr * scale, wd, cfg.momentum, is_lars)
            # biases: no decay and no trust ratio, as LARS implementations exclude 1-D parameters
            lars_sgd_step(b, b_grad, b_buf, lr * scale, no_wd, cfg.momentum, no_lars)
            step += 1
    return LinearHeads(w, b, base_lr, base_wd, is_lars)


@register("linear", LinearConfig, "sweep of linear heads (lr x SGD/LARS x wd) on frozen features")
def run(backbone: Backbone, cfg: LinearConfig) -> dict[str, float]:
    cfg.validate()
    device = resolve_device(cfg.device)
    cfg = replace(cfg, layers=resolve_layers(cfg.layers, backbone))
    train_x, train_y = split_features(backbone, cfg, cfg.train_split, cfg.layers)
    test_x, test_y = split_features(backbone, cfg, cfg.test_split, cfg.layers)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    val: tuple[Tensor, Tensor] | None = None
    if cfg.val_fraction > 0:
        perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        n_val = max(1, int(cfg.val_fraction * train_x.shape[0]))
        val = train_x[perm[:n_val]], train_y[perm[:n_val]]
        train_x, train_y = train_x[perm[n_val:]], train_y[perm[n_val:]]
    others = [test_x] if val is None else [test_x, val[0]]
    epochs = augmented_epochs(backbone, cfg, train_x) if cfg.augment else None
    train_x, *rest = (t.to(device) for t in standardise(train_x, *others))
    heads = train_linear_heads(train_x, train_y.to(device), n_classes, cfg, epochs)
    test_acc = heads.accuracies(rest[0], test_y.to(device))
    out: dict[str, float] = {}
    if val is None:
        best = int(test_acc.argmax())
    else:
        val_acc = heads.accuracies(rest[1], val[1].to(device))
        best = int(val_acc.argmax())
        out["linear_val_top1"] = float(val_acc[best])
    out.update(
        linear_top1=float(test_acc[best]),
        best_lr=float(heads.lr[best]),
        best_wd=float(heads.wd[best]),
        best_is_lars=float(heads.is_lars[best]),
        feature_dim=float(train_x.shape[1]),
    )
    if len(cfg.lrs) > 1 and out["best_lr"] in (min(cfg.lrs), max(cfg.lrs)):
        # the optimum may lie outside the sweep: say so rather than report a truncated search as the answer
        logger.warning(
            "linear: the best lr %g is at the edge of the sweep %s; consider extending lrs",
            out["best_lr"],
            list(cfg.lrs),
        )
    return out
