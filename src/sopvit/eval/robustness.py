"""Background robustness on ImageNet-9 (Xiao et al., 2020): a linear head on frozen [CLS] features.

``path`` is the IN-9 root with one folder per variant (``original/``, ``mixed_same/``, ``mixed_rand/``,
``only_fg/``, ``no_fg/`` ...), each holding ``val/<class>/`` images; only ``train_variant`` also needs
``train/<class>/``. The head is trained once on ``train_variant/train`` and scored on every variant's
``val/``, so a drop from ``mixed_same`` to ``mixed_rand`` (the "BG-gap") measures how much the
features rely on the background rather than the foreground object.

The head is the linear protocol's sweep (lr x SGD/LARS x wd trained in one pass); the winner is picked
on ``train_variant/val`` (the in-distribution split), then applied unchanged to the other variants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from torch import Tensor

from sopvit.config import check
from sopvit.device import resolve_device
from sopvit.eval.cache import EvalDataConfig, check_layers, split_features
from sopvit.eval.linear import OPTIMIZERS, LinearConfig, standardise, train_linear_heads
from sopvit.eval.registry import register
from sopvit.models import Backbone

IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_fg", "no_fg")


@dataclass
class RobustnessConfig(EvalDataConfig):
    dataset: str = "imagenet"  # fixed: every variant is read as a labelled <split>/<class>/ folder
    image_size: int = 224
    in_chans: int = 3
    train_split: str = "train"
    test_split: str = "val"
    variants: tuple[str, ...] = IN9_VARIANTS
    train_variant: str = "original"
    layers: str = "cls"
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    weight_decays: tuple[float, ...] = (0.0,)
    optimizers: tuple[str, ...] = ("sgd",)
    epochs: int = 100
    train_batch_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check(
            self.dataset == "imagenet", "dataset", "must be 'imagenet' (variant folders of <split>/<class>/)"
        )
        check(len(self.variants) > 0 and all(self.variants), "variants", "must be non-empty names")
        check(self.train_variant in self.variants, "train_variant", "must be one of variants")
        check_layers(self.layers)
        check(len(self.lrs) > 0 and min(self.lrs) > 0, "lrs", "must be non-empty and > 0")
        check(len(self.weight_decays) > 0 and min(self.weight_decays) >= 0, "weight_decays", "must be >= 0")
        check(len(self.optimizers) > 0 and set(self.optimizers) <= set(OPTIMIZERS), "optimizers", "sgd|lars")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.train_batch_size >= 1, "train_batch_size", "must be >= 1")

    def head_config(self) -> LinearConfig:
        return LinearConfig(
            lrs=self.lrs,
            weight_decays=self.weight_decays,
            optimizers=self.optimizers,
            epochs=self.epochs,
            train_batch_size=self.train_batch_size,
            seed=self.seed,
        )


def variant_features(
    backbone: Backbone, cfg: RobustnessConfig, variant: str, split: str
) -> tuple[Tensor, Tensor]:
    root = os.path.join(str(cfg.path), variant)
    if not os.path.isdir(os.path.join(root, split)):
        raise ValueError(f"variants: {os.path.join(root, split)!r} is not a directory")
    # Each variant is an ImageNet-style folder: the shared cached extraction reads root/split.
    return split_features(backbone, replace(cfg, dataset="imagenet", path=root), split, cfg.layers)


@register("robustness", RobustnessConfig, "ImageNet-9 background robustness: linear head, top-1 per variant")
def run(backbone: Backbone, cfg: RobustnessConfig) -> dict[str, float]:
    cfg.validate()
    device = resolve_device(cfg.device)
    train_x, train_y = variant_features(backbone, cfg, cfg.train_variant, cfg.train_split)
    evals = {v: variant_features(backbone, cfg, v, cfg.test_split) for v in cfg.variants}
    # class indices come from sorted subfolder names, so the variants must share one class list
    n_classes = int(max([train_y.max()] + [y.max() for _, y in evals.values()])) + 1
    train_x, *val_xs = (t.to(device) for t in standardise(train_x, *(x for x, _ in evals.values())))
    heads = train_linear_heads(train_x, train_y.to(device), n_classes, cfg.head_config())
    accs = {v: heads.accuracies(x, evals[v][1].to(device)) for v, x in zip(evals, val_xs, strict=True)}
    best = int(accs[cfg.train_variant].argmax())
    out = {f"robustness_top1_{v}": float(acc[best]) for v, acc in accs.items()}
    if "mixed_same" in accs and "mixed_rand" in accs:
        out["robustness_bg_gap"] = out["robustness_top1_mixed_same"] - out["robustness_top1_mixed_rand"]
    return out
