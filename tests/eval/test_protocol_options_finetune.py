"""Every FinetuneConfig field in a test where a wrong value changes a number (see test_protocol_options).

A fine-tuning run is observed through spies on what ``run`` builds: the optimizer (the lr and weight
decay of every parameter group at every step), the classifier (its training and test inputs and final
weights), the mixer and the losses (the targets), the train transform and the evaluations (after which
step each ran, and its top-1). The accuracy alone, on 32 test images after one epoch, would hide most
options.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torchvision.transforms import v2

from sopvit.data.eval_transforms import TimmRandAugment
from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval import finetune
from tests.eval.supervised_observe import (
    NO_ERASING,
    PLAIN,
    balanced_half,
    evaluated_folder,
    evaluated_on,
    observe_supervised,
    subset_trained,
    train_size,
    trained_on,
)
from tests.eval.test_protocol_options import (
    FOLDER,
    GREY_MEAN,
    GREY_STD,
    Obs,
    Row,
    Scenario,
    backbone_for,
    differs,
    every,
    folder_row,
    make_folder,
    raises,
    reproducible,
    same,
    same_on_cpu,
)

LIMIT, BATCH, DEPTH = 32, 8, 2  # vit_test has 2 blocks


# ------------------------------------------------------------------------------------------ checks
def schedule(sc: Scenario, row: Row) -> None:
    """Per-step lr of every group: linear warm-up to lr (as given, whatever the batch: BEiT's script does
    not rescale it), cosine to min_lr, times layer_decay ** (depth + 1 - layer) (head 1, last block decay,
    ..., embeddings decay ** (depth + 1))."""
    cfg, steps = sc.cfg(**row.overrides), sc.alt(row)["steps"]
    batch = min(cfg.train_batch_size, cfg.limit)
    per_epoch = cfg.limit // batch  # the last, partial batch is dropped
    total, warm = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    peak = cfg.lr
    assert len(steps) == total
    for t, groups in enumerate(steps):
        if t < warm:
            lr = peak * (t + 1) / warm
        else:
            lr = cfg.min_lr + (peak - cfg.min_lr) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2
        scales = sorted({scale for _, _, scale in groups})
        assert scales == pytest.approx(sorted(cfg.layer_decay**k for k in range(DEPTH + 2)))
        assert [g[0] for g in groups] == pytest.approx([lr * scale for _, _, scale in groups], rel=1e-9)


def decay_groups(sc: Scenario, row: Row) -> None:
    assert {wd for _, wd, _ in sc.alt(row)["steps"][0]} == {0.0, row.value}


def drop_path_rates(rates: list[float]) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["drop_path"] == pytest.approx(rates)  # linear in depth, from 0

    return check


def mixed(sc: Scenario, row: Row) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    (mixer,) = sc.alt(row)["_mix"]
    cfg = sc.cfg(**row.overrides)
    assert (mixer["kwargs"]["mixup_alpha"], mixer["kwargs"]["cutmix_alpha"]) == (cfg.mixup, cfg.cutmix)
    assert mixer["calls"]
    return list(mixer["calls"])


def soft_targets(y: Tensor, lam: float, smoothing: float, n_classes: int = 10) -> Tensor:
    """Each image's smoothed one-hot blended with its partner's (the batch reversed), weights lam, 1 - lam."""
    one = torch.full((len(y), n_classes), smoothing / n_classes)
    one[torch.arange(len(y)), y] += 1 - smoothing
    return lam * one + (1 - lam) * one.flip(0)


def lam_of(y: Tensor, target: Tensor, smoothing: float) -> float:
    """The blend weight, read off the own class of an image whose partner is of another class."""
    i = int((y != y.flip(0)).nonzero()[0])
    return float((target[i, y[i]] - smoothing / 10) / (1 - smoothing))


def mixup_only(sc: Scenario, row: Row) -> None:
    """Mixup: images and targets blended with the same lam."""
    s = sc.cfg(**row.overrides).label_smoothing
    for before, after, y, target in mixed(sc, row):
        lam = lam_of(y, target, s)
        assert torch.allclose(target, soft_targets(y, lam, s), atol=1e-5)
        assert torch.allclose(after, lam * before + (1 - lam) * before.flip(0), atol=1e-5)


def cutmix_only(sc: Scenario, row: Row) -> None:
    """CutMix: every pixel is the image's own or its partner's, never a blend."""
    s = sc.cfg(**row.overrides).label_smoothing
    pasted = 0
    for before, after, y, target in mixed(sc, row):
        assert bool(((after == before) | (after == before.flip(0))).all())
        pasted += int((after != before).sum())
        assert torch.allclose(target, soft_targets(y, lam_of(y, target, s), s), atol=1e-5)
    assert pasted > 0


def smoothed_targets(sc: Scenario, row: Row) -> None:
    """Through the mixer: a class neither image has gets exactly label_smoothing / classes."""
    for _, _, _, target in mixed(sc, row):
        assert float(target.min()) == pytest.approx(row.value / 10)


def smoothed_loss(sc: Scenario, row: Row) -> None:
    """Without mixing the loss smooths hard labels itself."""
    obs = sc.alt(row)
    assert obs["_smoothing"] == [sc.cfg(**row.overrides).label_smoothing]
    assert obs["targets"] and not obs["_mix"]


# timm's RandAugment op lists: 'inc1' picks the variants whose strength grows with the magnitude
INCREASING = [
    *("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing"),
    *("SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"),
    *("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"),
]
PLAIN_OPS = [name.removesuffix("Increasing") for name in INCREASING]


def rand_augment_of(obs: Obs) -> list[RandAugment]:
    steps = obs["_transform"].pipeline.transforms
    return [t.augment for t in steps if isinstance(t, TimmRandAugment)]


def rand_augment(layers: int, ops: list[str], magnitude: int, std: float) -> Any:
    """The RandAugment timm builds from the string: ops per image, op list, magnitude and its noise, with
    create_transform's hyper-parameters (translations to 45% of the size, the grey mean as fill, bicubic)."""

    def check(sc: Scenario, row: Row) -> None:
        (ra,) = rand_augment_of(sc.alt(row))
        assert ra.num_layers == layers and [op.name for op in ra.ops] == ops
        for op in ra.ops:
            assert (op.magnitude, op.magnitude_std, op.prob) == (magnitude, std, 0.5)
            assert op.hparams["translate_const"] == int(sc.cfg(**row.overrides).image_size * 0.45)
            assert op.hparams["img_mean"] == (round(255 * GREY_MEAN),)
            assert op.kwargs["resample"] == Image.Resampling.BICUBIC

    return check


def no_rand_augment(sc: Scenario, row: Row) -> None:
    """None turns RandAugment off; the default is timm's 'rand-m9-mstd0.5-inc1' (BEiT's --aa)."""
    assert rand_augment_of(sc.alt(row)) == []
    (default,) = rand_augment_of(sc.ref(row))
    assert default.num_layers == 2 and [op.name for op in default.ops] == INCREASING
    assert {(op.magnitude, op.magnitude_std) for op in default.ops} == {(9, 0.5)}


def views(images: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Standardised whole images, resized as the crop or the test Resize resizes them (uint8, antialiased)."""
    mode = v2.InterpolationMode(interpolation)
    resized = v2.functional.resize(images, [size, size], interpolation=mode, antialias=True)
    return (resized.float() / 255 - GREY_MEAN) / GREY_STD


def whole_image_views(sc: Scenario, row: Row) -> None:
    """Crops of scale 1 are whole images: every training input is a train image or its mirror."""
    cfg = sc.cfg(**row.overrides)
    images, _ = load_fashion_mnist(cfg.train_split, limit=cfg.limit)
    plain = views(images, cfg.image_size, cfg.train_interpolation)
    mirror = views(images.flip(-1), cfg.image_size, cfg.train_interpolation)
    for x in sc.alt(row)["inputs"]:
        assert x.shape[-1] == cfg.image_size
        err = [(x[:, None] - v[None]).flatten(2).abs().amax(-1).amin(1) for v in (plain, mirror)]
        assert bool((torch.minimum(*err) < 1e-5).all())
    smaller = sc.observe(**{**row.overrides, "crop_scale_min": 0.08})["inputs"][0]  # smaller crops are not
    assert not bool(((smaller[:, None] - plain[None]).flatten(2).abs().amax(-1) < 1e-5).any())


def erased(x: Tensor) -> Tensor:
    """Which images hold erased pixels: timm's 'pixel' mode fills with normal noise, off the uint8 grid
    that every other (standardised) pixel lies on."""
    levels = (x * GREY_STD + GREY_MEAN) * 255
    return ((levels - levels.round()).abs() > 1e-3).flatten(1).any(1)


def erasing(p: float) -> Any:
    """The transform holds timm's RandomErasing(p, 'pixel', one box); that share of the images is erased."""

    def check(sc: Scenario, row: Row) -> None:
        obs = sc.alt(row)
        found = [t for t in obs["_transform"].pipeline.transforms if isinstance(t, RandomErasing)]
        if p == 0:
            assert found == []
        else:
            assert [(t.probability, t.mode, t.min_count, t.max_count) for t in found] == [(p, "pixel", 1, 1)]
        share = float(torch.cat([erased(x) for x in obs["inputs"]]).float().mean())
        if p in (0.0, 1.0):
            assert share == p
        else:
            assert 0.1 < share < 0.5, share

    return check


def interpolated(name: str) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        (crop,) = [
            t for t in sc.alt(row)["_transform"].pipeline.transforms if isinstance(t, v2.RandomResizedCrop)
        ]
        assert crop.interpolation == v2.InterpolationMode(name)

    return check


def eval_views(sc: Scenario, row: Row) -> None:
    """The test images, resized 28 -> image_size with the eval interpolation (no crop: native size)."""
    cfg = sc.cfg(**row.overrides)
    images, _ = load_fashion_mnist(cfg.test_split, limit=cfg.limit)
    expected = views(images, cfg.image_size, cfg.eval_interpolation)
    assert torch.allclose(sc.alt(row)["test_inputs"], expected, atol=1e-5, rtol=0)
    other = "bicubic" if cfg.eval_interpolation == "bilinear" else "bilinear"
    assert not torch.allclose(views(images, cfg.image_size, other), expected, atol=1e-3, rtol=0)


def evaluated_after(epochs: list[int]) -> Any:
    """Evaluated after these epochs only; last = the final one, best = the first epoch at the maximum."""

    def check(sc: Scenario, row: Row) -> None:
        obs, cfg = sc.alt(row), sc.cfg(**row.overrides)
        per_epoch = cfg.limit // cfg.train_batch_size
        assert obs["evaluated"] == [e * per_epoch for e in epochs]
        top1s, out = obs["top1s"], obs["out"]
        assert out["finetune_top1"] == top1s[-1]
        assert out["finetune_best_top1"] == max(top1s) >= out["finetune_top1"]
        assert out["finetune_best_epoch"] == epochs[top1s.index(max(top1s))]

    return check


def nothing_cached(sc: Scenario, row: Row) -> None:
    """Fine-tuning has no frozen features to cache: the numbers stay, no file appears."""
    same(atol=0.0)(sc, row)
    assert not list(Path(sc.cfg(**row.overrides).cache_dir).glob("**/*"))


FINETUNE_ROWS = [
    Row("epochs", 2, every(schedule, differs("state"))),
    Row("warmup_epochs", 0.0, every(schedule, differs("state"))),
    Row("train_batch_size", 4, every(schedule, differs("state"))),
    Row("lr", 1e-3, every(schedule, differs("state"))),
    Row("min_lr", 1e-4, every(schedule, differs("state"))),
    Row("layer_decay", 0.5, every(schedule, differs("state"))),
    Row("weight_decay", 0.2, every(decay_groups, differs("state"))),
    Row("drop_path", 0.3, every(drop_path_rates([0.0, 0.3]), differs("state"))),
    Row("mixup", 0.0, every(cutmix_only, differs("state"))),
    Row("cutmix", 0.0, every(mixup_only, differs("state"))),
    Row("mixup", 0.0, every(smoothed_loss, differs("state")), (("cutmix", 0.0),)),
    Row("label_smoothing", 0.3, every(smoothed_targets, differs("state"))),
    Row("label_smoothing", 0.3, every(smoothed_loss, differs("state")), PLAIN),
    Row("auto_augment", None, every(no_rand_augment, differs("state"))),
    Row("auto_augment", "rand-m5-n3-mstd0", every(rand_augment(3, PLAIN_OPS, 5, 0.0), differs("state"))),
    Row("auto_augment", "rand-m9-q1", raises(ValueError, "auto_augment")),
    Row("reprob", 1.0, every(erasing(1.0), differs("state")), NO_ERASING),
    Row("reprob", 0.0, every(erasing(0.0), differs("state")), NO_ERASING),
    Row("reprob", 0.25, erasing(0.25), NO_ERASING),  # the default: about a quarter of the images
    Row("crop_scale_min", 1.0, every(whole_image_views, differs("state")), PLAIN),
    Row("image_size", 20, whole_image_views, (*PLAIN, ("crop_scale_min", 1.0))),
    Row(
        "train_interpolation",
        "bilinear",
        every(interpolated("bilinear"), whole_image_views, differs("inputs")),
        (*PLAIN, ("crop_scale_min", 1.0), ("image_size", 20)),
    ),
    Row(
        "train_interpolation",
        "bicubic",  # the default
        every(interpolated("bicubic"), whole_image_views),
        (*PLAIN, ("crop_scale_min", 1.0), ("image_size", 20)),
    ),
    Row("eval_interpolation", "bicubic", every(eval_views, differs("test_inputs"))),
    Row("eval_interpolation", "bilinear", eval_views),  # the default (BEiT's Resize(interpolation=2))
    # evaluating never changes the training: the same weights whichever epochs are evaluated
    Row("eval_every", 2, every(evaluated_after([2, 3]), same("state", "steps", atol=0.0)), (("epochs", 3),)),
    Row("eval_every", 1, evaluated_after([1, 2, 3]), (("epochs", 3),)),  # the default: every epoch
    Row("eval_every", 5, evaluated_after([3]), (("epochs", 3),)),  # the last epoch always
    # Workers draw augmentations from their own seeded streams, so only a pipeline without random
    # content (whole crops of mirror-symmetric images) can give the same numbers for any worker count.
    Row("num_workers", 2, same(atol=0.0), (*PLAIN, ("crop_scale_min", 1.0), *FOLDER)),
    Row("subset_file", "{tmp}/subset.txt", every(subset_trained, train_size(6)), PLAIN),
    Row("subset_fraction", 0.5, balanced_half),
    Row("seed", 1, every(differs("state"), reproducible)),
    Row("seed", 1, every(balanced_half, differs("idx")), (("subset_fraction", 0.5),)),
    Row("train_split", "test", trained_on("test"), PLAIN),
    Row("test_split", "train", evaluated_on("train")),
    Row("limit", 16, every(train_size(16), schedule)),
    Row("in_chans", 3, raises(ValueError, "in_chans")),
    *(folder_row(f, evaluated_folder) for f in ("dataset", "path")),
    Row("batch_size", 5, same(atol=0.0)),  # the evaluation batch
    Row("device", "auto", same_on_cpu),
    Row("cache_dir", "{tmp}/cache", nothing_cached),
]

TABLES = {"finetune": (finetune.FinetuneConfig, FINETUNE_ROWS)}


@pytest.fixture(scope="module")
def finetune_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("finetune")
    make_folder(tmp / "folder")
    (tmp / "subset.txt").write_text("1\n4\n9\n16\n25\n30\n")
    (tmp / "cache").mkdir()
    backbone = backbone_for(1)
    base = finetune.FinetuneConfig(
        image_size=16,
        limit=LIMIT,
        epochs=1,
        warmup_epochs=0.5,
        train_batch_size=BATCH,
        num_workers=0,
        device="cpu",
    )
    return Scenario(
        base,
        observe_supervised(finetune, "Classifier", backbone, ("lr", "weight_decay", "lr_scale")),
        backbone,
        tmp,
    )


@pytest.mark.parametrize("row", FINETUNE_ROWS, ids=str)
def test_finetune_option(finetune_scenario: Scenario, row: Row) -> None:
    row.check(finetune_scenario, row)
