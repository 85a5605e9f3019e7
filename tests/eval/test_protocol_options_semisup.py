"""Every SemisupConfig field in a test where a wrong value changes a number (see test_protocol_options).

A semi-supervised run is observed through spies on what ``run`` builds: the optimizer (lr and weight decay
of every parameter group at every step), the model (its weights when built and after training, its
training and test inputs), the mixer and the losses (the targets), the train transform and the
evaluations. The encoder is a vit_test backbone with a 3-layer projection head (hidden 64, bottleneck 32).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch import Tensor, nn
from torchvision.transforms import v2

from sopvit.data.eval_transforms import TimmRandAugment
from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval import semisup
from sopvit.models import Encoder, ProjectionHead
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
from tests.eval.test_protocol_options_finetune import (
    cutmix_only,
    mixup_only,
    nothing_cached,
    smoothed_loss,
    smoothed_targets,
)

LIMIT, BATCH, HIDDEN, BOTTLENECK = 32, 8, 64, 32

WHOLE = (*PLAIN, ("crop_scale_min", 1.0))  # crops of scale 1 are whole images


def tiny_encoder() -> Encoder:
    backbone = backbone_for(1)
    return Encoder(backbone, ProjectionHead(backbone.embed_dim, HIDDEN, BOTTLENECK, n_layers=3))


# ------------------------------------------------------------------------------------------ checks
def schedule(sc: Scenario, row: Row) -> None:
    """Per-step lr, the same in every group: linear warm-up from warmup_lr to lr * batch / 512, then cosine
    to min_lr (which may lie above the peak, as the reference's 1e-5 does at small batches)."""
    cfg, steps = sc.cfg(**row.overrides), sc.alt(row)["steps"]
    n = int(sc.alt(row)["out"]["semisup_train_size"])
    batch = min(cfg.train_batch_size, n)
    per_epoch = n // batch  # the last, partial batch is dropped
    total, warm = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    peak = cfg.lr * batch / 512
    assert len(steps) == total
    for t, groups in enumerate(steps):
        if t < warm:
            lr = cfg.warmup_lr + (peak - cfg.warmup_lr) * t / warm
        else:
            lr = cfg.min_lr + (peak - cfg.min_lr) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2
        assert [g[0] for g in groups] == pytest.approx([lr] * len(groups), rel=1e-9)


def decay_groups(sc: Scenario, row: Row) -> None:
    """Two groups: weight decay on matrices, none on the rest (their members: test_semisup.py)."""
    assert sorted(wd for _, wd in sc.alt(row)["steps"][0]) == [0.0, row.value]


def drop_path_rates(rates: list[float]) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["drop_path"] == pytest.approx(rates)  # linear in depth, from 0

    return check


def kept_head(n: int) -> Any:
    """The model holds the backbone, the first n head layers (Linear + GELU each, under the head's names,
    with the encoder's weights) and a classifier as wide as the last kept layer."""
    widths = {0: 32, 1: HIDDEN, 2: HIDDEN, 3: BOTTLENECK}  # vit_test is 32 wide

    def check(sc: Scenario, row: Row) -> None:
        obs, head = sc.alt(row), sc.backbone.head.state_dict()
        kept = {k.removeprefix("head."): v for k, v in obs["built"].items() if k.startswith("head.")}
        assert sorted(kept) == sorted(f"mlp.{2 * i}.{p}" for i in range(n) for p in ("weight", "bias"))
        assert all(torch.equal(v, head[k]) for k, v in kept.items())
        assert obs["built"]["classifier.weight"].shape == (10, widths[n])
        assert not any(torch.equal(obs["state"][f"head.{k}"], v) for k, v in kept.items())  # trained
        model = obs["_model"]
        if n == 3:  # the whole head, L2 normalisation included
            assert isinstance(model.head, ProjectionHead)
        elif n:
            kinds = [type(m) for m in model.head.mlp]
            assert kinds == [nn.Linear, nn.GELU] * n

    return check


def views(images: Tensor, size: int, interpolation: str) -> Tensor:
    """Standardised whole images resized as RandomResizedCrop resizes its crop (uint8, antialiased)."""
    mode = v2.InterpolationMode(interpolation)
    resized = v2.functional.resize(images, [size, size], interpolation=mode, antialias=True)
    return (resized.float() / 255 - GREY_MEAN) / GREY_STD


def nearest_view(x: Tensor, images: Tensor, size: int, interpolation: str) -> Tensor:
    """Per input, the largest pixel error to the closest whole train image or its mirror."""
    plain, mirror = views(images, size, interpolation), views(images.flip(-1), size, interpolation)
    err = [(x[:, None] - v[None]).flatten(2).abs().amax(-1).amin(1) for v in (plain, mirror)]
    return torch.minimum(*err)


def whole_image_views(interpolation: str) -> Any:
    """Crops of scale 1 are whole images: every training input is a train image or its mirror, resized
    with ``interpolation`` (and not with the other one)."""

    def check(sc: Scenario, row: Row) -> None:
        cfg = sc.cfg(**row.overrides)
        images, _ = load_fashion_mnist(cfg.train_split, limit=cfg.limit)
        other = "bilinear" if interpolation == "bicubic" else "bicubic"
        for x in sc.alt(row)["inputs"]:
            assert x.shape[-1] == cfg.image_size
            assert bool((nearest_view(x, images, cfg.image_size, interpolation) < 1e-5).all())
            assert bool((nearest_view(x, images, cfg.image_size, other) > 1e-3).all())

    return check


def erased(sc: Scenario, row: Row) -> None:
    """reprob 1: timm's RandomErasing with that probability, and no input is a clean whole image."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    found = [t.probability for t in obs["_transform"].pipeline.transforms if isinstance(t, RandomErasing)]
    assert found == [1.0]
    images, _ = load_fashion_mnist(cfg.train_split, limit=cfg.limit)
    for x in obs["inputs"]:
        assert bool((nearest_view(x, images, cfg.image_size, cfg.train_interpolation) > 1e-3).all())
    clean = sc.observe(**{**row.overrides, "reprob": 0.0})["inputs"]
    for x in clean:
        assert bool((nearest_view(x, images, cfg.image_size, cfg.train_interpolation) < 1e-5).all())


def randaug(config: str | None) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        steps = sc.alt(row)["_transform"].pipeline.transforms
        assert [t.config for t in steps if isinstance(t, TimmRandAugment)] == (
            [] if config is None else [config]
        )

    return check


def eval_views(interpolation: str) -> Any:
    """Every test input is the standardised test image resized to image_size with ``interpolation``."""

    def check(sc: Scenario, row: Row) -> None:
        cfg = sc.cfg(**row.overrides)
        images, _ = load_fashion_mnist(cfg.test_split, limit=cfg.limit)
        expected = views(images, cfg.image_size, interpolation)
        got = sc.alt(row)["test_inputs"]
        assert torch.allclose(got, expected.repeat(len(got) // len(expected), 1, 1, 1), atol=1e-5)

    return check


def repeated(sc: Scenario, row: Row) -> None:
    """Repeated augmentation: an epoch of 32 samples is ~11 images, 3 copies in a row, each its own view."""
    obs = sc.alt(row)
    targets, x = torch.cat(obs["targets"]), torch.cat(obs["inputs"])
    assert len(targets) == LIMIT  # an epoch costs as many samples as without repetition
    t = targets[:30].view(10, 3)
    assert bool((t == t[:, :1]).all())
    copies = x[:30].view(10, 3, -1)
    assert bool(((copies[:, 0] - copies[:, 1]).abs().amax(-1) > 1e-3).all())


def evaluations(epochs: list[int]) -> Any:
    """Evaluated after these epochs; the last one's top-1 and the best (the first epoch reaching it)."""

    def check(sc: Scenario, row: Row) -> None:
        out, top1s = sc.alt(row)["out"], sc.alt(row)["top1s"]
        assert len(top1s) == len(epochs)
        assert out["semisup_top1"] == top1s[-1] and out["semisup_best_top1"] == max(top1s)
        assert out["semisup_best_epoch"] == epochs[top1s.index(max(top1s))]

    return check


SEMISUP_ROWS = [
    Row("head_layers", 0, kept_head(0)),
    Row("head_layers", 2, kept_head(2)),
    Row("head_layers", 3, kept_head(3)),
    Row("head_layers", 4, raises(ValueError, "head_layers: .* has 3 layers")),
    Row("epochs", 2, every(schedule, differs("state"))),
    Row("warmup_epochs", 0.0, every(schedule, differs("state"))),
    Row("train_batch_size", 4, every(schedule, differs("state"))),
    Row("lr", 1e-3, every(schedule, differs("state"))),
    Row("warmup_lr", 0.0, every(schedule, differs("state"))),
    Row("min_lr", 0.0, every(schedule, differs("state"))),
    Row("weight_decay", 0.2, every(decay_groups, differs("state"))),
    Row("drop_path", 0.3, every(drop_path_rates([0.0, 0.3]), differs("state"))),
    Row("mixup", 0.0, every(cutmix_only, differs("state"))),
    Row("cutmix", 0.0, every(mixup_only, differs("state"))),
    Row("mixup", 0.0, every(smoothed_loss, differs("state")), (("cutmix", 0.0),)),
    Row("label_smoothing", 0.3, every(smoothed_targets, differs("state"))),
    Row("label_smoothing", 0.3, every(smoothed_loss, differs("state")), PLAIN),
    Row("auto_augment", None, every(randaug(None), differs("state"))),
    Row("auto_augment", "rand-m3-n1", every(randaug("rand-m3-n1"), differs("state"))),
    Row("auto_augment", "nope", raises(ValueError, "auto_augment")),
    Row("reprob", 1.0, every(erased, differs("state")), (*NO_ERASING, ("crop_scale_min", 1.0))),
    Row("train_interpolation", "bilinear", every(whole_image_views("bilinear"), differs("state")), WHOLE),
    Row("eval_interpolation", "bilinear", every(eval_views("bilinear"), differs("test_inputs"))),
    Row("image_size", 20, every(whole_image_views("bicubic"), eval_views("bicubic")), WHOLE),
    Row("crop_scale_min", 1.0, every(whole_image_views("bicubic"), differs("state")), PLAIN),
    Row("repeated_aug", 3, every(repeated, differs("state")), PLAIN),
    # evaluating leaves the training as it was (the test loader's seed is drawn on a forked RNG)
    Row("eval_every", 2, every(evaluations([2, 3]), same("state", "steps", atol=0.0)), (("epochs", 3),)),
    # Workers draw augmentations from their own seeded streams, so only a pipeline without random
    # content (whole crops of mirror-symmetric images) can give the same numbers for any worker count.
    Row("num_workers", 2, same(atol=0.0), (*WHOLE, *FOLDER)),
    Row("subset_file", "{tmp}/subset.txt", every(subset_trained, train_size(6)), PLAIN),
    Row("subset_fraction", 0.5, every(balanced_half, schedule)),
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

TABLES = {"semisup": (semisup.SemisupConfig, SEMISUP_ROWS)}


@pytest.fixture(scope="module")
def semisup_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("semisup")
    make_folder(tmp / "folder")
    (tmp / "subset.txt").write_text("1\n4\n9\n16\n25\n30\n")
    (tmp / "cache").mkdir()
    encoder = tiny_encoder()
    base = semisup.SemisupConfig(
        image_size=16,
        limit=LIMIT,
        epochs=1,
        warmup_epochs=0.5,
        train_batch_size=BATCH,
        repeated_aug=1,  # every image once per epoch; the repeated_aug row turns it on
        num_workers=0,
        device="cpu",
    )
    return Scenario(
        base, observe_supervised(semisup, "SemisupClassifier", encoder, ("lr", "weight_decay")), encoder, tmp
    )


@pytest.mark.parametrize("row", SEMISUP_ROWS, ids=str)
def test_semisup_option(semisup_scenario: Scenario, row: Row) -> None:
    row.check(semisup_scenario, row)
