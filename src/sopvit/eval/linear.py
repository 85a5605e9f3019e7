"""Linear probing: a sweep of linear heads over frozen features, all trained in one pass.

``preset: fast`` (the default; Fashion-MNIST, quick checks) extracts the features of the unaugmented
images once (cached), standardises them and evaluates the heads after the last epoch. ``preset: paper``
(the ImageNet recipes) is DINO/iBOT/SOP's protocol: new random-resized crop + flip views of train every
epoch (the backbone runs once per epoch, sharded over ranks), raw features, SOP's lr x wd x {SGD, LARS}
grid, every head evaluated after every epoch. ``linear_presets.py`` lists every value with its source.

DINO/iBOT probe ViT-S with the [CLS] of the last 4 blocks and ViT-B with [CLS] + mean patch token
(``layers: auto``). Every (lr, optimizer, weight decay) head is one slice of an (H, F, C) weight tensor,
so the sweep costs a single batched matmul per step instead of H training runs.

``linear_top1`` is the test top-1 of the best head at the best evaluated epoch, ``linear_best_epoch`` that
epoch (1-based; the last with ``val_every: 0``). Both are picked on test, as DINO's code does, or on a
held-out part of train with ``val_fraction`` (then also reported: ``linear_val_top1``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from sopvit.config import check
from sopvit.data.eval_transforms import SupervisedTrainTransform
from sopvit.data.seeding import mix_seed
from sopvit.device import resolve_device
from sopvit.eval.cache import (
    EvalDataConfig,
    check_layers,
    extract_dataset_features,
    resolve_layers,
    split_features,
)
from sopvit.eval.linear_presets import PRESET_FIELDS, PRESETS, LinearSettings, resolve_settings
from sopvit.eval.registry import register
from sopvit.models import Backbone
from sopvit.optim.schedules import cosine

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "lars")


@dataclass
class LinearConfig(EvalDataConfig):
    # "fast" (default): cached standardised features; "paper": DINO/iBOT/SOP's protocol. A field below
    # left null takes the preset's value (linear_presets.PRESETS); set it to override the preset.
    preset: str = "fast"
    # "lastN": [CLS] of the last N blocks; "cls+avgpool": [CLS] + mean patch token; "auto": the paper's
    # choice for the architecture (ViT-S: last4, ViT-B/L: cls+avgpool)
    layers: str = "auto"
    lrs: tuple[float, ...] | None = None  # per 256 images (x train_batch_size/256)
    weight_decays: tuple[float, ...] | None = None
    optimizers: tuple[str, ...] | None = None  # "sgd" and/or "lars"
    lars_eta: float | None = None  # LARS trust coefficient: weight steps scaled by eta ||w|| / ||g||
    augment: bool | None = None  # new random crops + flips of train every epoch; false: extracted once
    standardise: bool | None = None  # zero mean / unit std per feature (train statistics); false: raw
    val_every: int | None = None  # evaluate after epochs 1, 1+N, ... and the last, keep the best; 0: last
    momentum: float = 0.9
    epochs: int = 100
    train_batch_size: int = 1024
    val_fraction: float = 0.0  # >0: pick the head on a held-out part of train; 0: on test (DINO's habit)
    crop_scale_min: float = 0.08  # augment: RandomResizedCrop scale range (crop_scale_min, 1)
    seed: int = 0

    def settings(self) -> LinearSettings:
        """The preset's values with this config's non-null fields in their place."""
        return resolve_settings(self.preset, **{name: getattr(self, name) for name in PRESET_FIELDS})

    def validate(self) -> None:
        super().validate()
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(map(repr, PRESETS))}")
        s = self.settings()
        check_layers(self.layers, allow_auto=True)
        check(len(s.lrs) > 0 and min(s.lrs) > 0, "lrs", "must be non-empty and > 0")
        check(len(s.weight_decays) > 0 and min(s.weight_decays) >= 0, "weight_decays", "must be >= 0")
        check(len(s.optimizers) > 0 and set(s.optimizers) <= set(OPTIMIZERS), "optimizers", "sgd|lars")
        check(s.lars_eta > 0, "lars_eta", "must be > 0")
        check(s.val_every >= 0, "val_every", "must be >= 0 (0: evaluate after the last epoch only)")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.train_batch_size >= 1, "train_batch_size", "must be >= 1")
        check(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", "must be in (0, 1]")
        by_preset = f" (on in preset {self.preset!r})" if self.augment is None else ""
        check(not (s.augment and self.val_fraction > 0), "val_fraction", "must be 0 with augment" + by_preset)


def feature_stats(train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (N, F) -> (F,), (F,) of the train set."""
    return train.mean(0), train.std(0, correction=0).clamp_min(1e-6)


def standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale every feature to zero mean / unit std of the train set (a frozen BatchNorm, without the BN)."""
    mean, std = feature_stats(train)
    return [(t - mean) / std for t in (train, *others)]


def augmented_epochs(backbone: Backbone, cfg: LinearConfig, clean_train: Tensor) -> Callable[[int], Tensor]:
    """``epoch -> (N, F)`` features of fresh random crops + flips of the train split, on cfg's device.

    With ``standardise`` they are scaled by the statistics of the unaugmented features, so every epoch
    (and the test split) shares one scale; without, they are the backbone's raw features.
    """
    stats = feature_stats(clean_train) if cfg.settings().standardise else None
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
        if stats is not None:
            x = (x - stats[0]) / stats[1]
        return x.to(device)

    return features


@torch.no_grad()
def lars_sgd_step(
    w: Tensor,
    grad: Tensor,
    buf: Tensor,
    lr: Tensor,
    wd: Tensor,
    momentum: float,
    is_lars: Tensor,
    eta: float = 1.0,
) -> None:
    """In-place momentum step of H stacked heads (dim 0), each with its own lr, wd and optimizer.

    SGD: ``g = grad + wd w``. LARS additionally scales ``g`` by ``eta ||w|| / ||g||`` of its head (1 where
    either norm is 0, e.g. at a zero init). Then ``buf = m buf + g; w -= lr buf``.
    """
    shape = (-1,) + (1,) * (w.ndim - 1)
    g = grad + wd.view(shape) * w
    w_norm = w.flatten(1).norm(dim=1)
    g_norm = g.flatten(1).norm(dim=1)
    trust = torch.where(
        (w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm.clamp_min(1e-12), torch.ones_like(w_norm)
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
    after_epoch: Callable[[int, LinearHeads], None] | None = None,
) -> LinearHeads:
    """SGD/LARS heads for every (lr, optimizer, wd) of ``cfg``, trained together on (x, y) with cosine lr.

    ``epoch_features(e)``, when given, replaces ``x`` (N, F) in epoch ``e`` (augmented views, same order).
    ``after_epoch(e, heads)`` sees the heads after epoch ``e`` (0-based); they are updated in place later,
    so it must read them (e.g. evaluate them) before it returns.
    """
    s = cfg.settings()
    grid = [(lr, opt, wd) for lr in s.lrs for opt in s.optimizers for wd in s.weight_decays]
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
        for start in range(0, x.shape[0], cfg.train_batch_size):
            idx = perm[start : start + cfg.train_batch_size]
            xb, yb = x[idx], y[idx]
            w.requires_grad_(True)
            b.requires_grad_(True)
            with torch.enable_grad():
                logits = torch.einsum("nf,hfc->hnc", xb, w) + b[:, None]
                # sum over heads of each head's mean loss: the heads' gradients stay independent
                loss = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(grid)), reduction="sum")
                w_grad, b_grad = torch.autograd.grad(loss / xb.shape[0], (w, b))
            w, b = w.detach(), b.detach()
            scale = cosine(step, total, 1.0, 0.0)
            lars_sgd_step(w, w_grad, w_buf, lr * scale, wd, cfg.momentum, is_lars, s.lars_eta)
            # biases: no decay and no trust ratio, as LARS implementations exclude 1-D parameters
            lars_sgd_step(b, b_grad, b_buf, lr * scale, no_wd, cfg.momentum, no_lars)
            step += 1
        if after_epoch is not None:
            after_epoch(epoch, LinearHeads(w, b, base_lr, base_wd, is_lars))
    return LinearHeads(w, b, base_lr, base_wd, is_lars)


@dataclass
class BestEpoch:
    """``after_epoch`` bookkeeping: the (epoch, head) a run reports, as DINO's ``best_acc`` over epochs.

    The heads are evaluated after epochs 1, 1 + ``val_every``, ... and the last (all epochs with 1, only
    the last with 0) on ``test`` and, when given, on ``val``, which then picks. Within one evaluation the
    first of equal heads wins; a later epoch must be strictly better, so a tie keeps the earlier epoch.
    """

    test: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    epochs: int
    val_every: int
    out: dict[str, float] = field(default_factory=dict)  # the reported numbers of the best so far
    score: float = -1.0  # its picking accuracy

    def due(self, epoch: int) -> bool:
        return epoch == self.epochs - 1 or (self.val_every > 0 and epoch % self.val_every == 0)

    def __call__(self, epoch: int, heads: LinearHeads) -> None:
        if not self.due(epoch):
            return
        test_acc = heads.accuracies(*self.test)
        pick = test_acc if self.val is None else heads.accuracies(*self.val)
        h = int(pick.argmax())
        if float(pick[h]) > self.score:
            self.score = float(pick[h])
            self.out = {} if self.val is None else {"linear_val_top1": float(pick[h])}
            self.out.update(
                linear_top1=float(test_acc[h]),
                linear_best_epoch=float(epoch + 1),
                best_lr=float(heads.lr[h]),
                best_wd=float(heads.wd[h]),
                best_is_lars=float(heads.is_lars[h]),
            )
        logger.info(
            "linear: epoch %d/%d, best head %.2f (best %.2f)",
            epoch + 1,
            self.epochs,
            float(pick[h]),
            self.score,
        )


@register("linear", LinearConfig, "sweep of linear heads (lr x SGD/LARS x wd) on frozen features; fast|paper")
def run(backbone: Backbone, cfg: LinearConfig) -> dict[str, float]:
    cfg.validate()
    s = cfg.settings()
    logger.info("linear: preset %r -> %s", cfg.preset, s)
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
    epochs = augmented_epochs(backbone, cfg, train_x) if s.augment else None
    features = standardise(train_x, *others) if s.standardise else [train_x, *others]
    train_x, *rest = (t.to(device) for t in features)
    held_out = None if val is None else (rest[1], val[1].to(device))
    best = BestEpoch((rest[0], test_y.to(device)), held_out, cfg.epochs, s.val_every)
    train_linear_heads(train_x, train_y.to(device), n_classes, cfg, epochs, best)
    out = {**best.out, "feature_dim": float(train_x.shape[1])}
    if len(s.lrs) > 1 and out["best_lr"] in (min(s.lrs), max(s.lrs)):
        # the optimum may lie outside the sweep: say so rather than report a truncated search as the answer
        logger.warning(
            "linear: the best lr %g is at the edge of the sweep %s; consider extending lrs",
            out["best_lr"],
            list(s.lrs),
        )
    return out
