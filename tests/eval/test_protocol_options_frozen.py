"""The option tables of the frozen-feature protocols: k-NN, linear, logreg, robustness.

See test_protocol_options for the machinery. References: a weighted k-NN vote one query at a time;
each linear head trained on its own with torch.optim.SGD; logreg judged by the optimality of its fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval import knn, linear, logreg, robustness
from sopvit.models import Backbone
from tests.eval.test_protocol_options import (
    FOLDER,
    Check,
    Obs,
    Row,
    Scenario,
    backbone_for,
    cache_used,
    close,
    differs,
    every,
    folder_row,
    make_folder,
    raises,
    ref_features,
    ref_standardise,
    reproducible,
    same,
    same_on_cpu,
    spy,
    top1,
)
from tests.eval.test_robustness import COLOURS

LIMIT = 40  # train[:40] has a unique majority class (0: 7 images), which the logreg `c` check needs


# -------------------------------------------------------------------------------------- references
def ref_knn(
    train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor, k: int, t: float
) -> tuple[float, float]:
    """Weighted k-NN one query at a time: the k most similar train images vote with exp(cos / t).

    Returns (top-1, top-5): the 5 (or k, if fewer) classes with the most vote, among those voted for.
    """
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    correct, correct5 = 0, 0
    for q, truth in zip(test, test_y.tolist()):
        sims = (train @ q).tolist()
        votes: dict[int, float] = {}
        for i in sorted(range(len(sims)), key=lambda i: -sims[i])[:k]:
            label = int(train_y[i])
            votes[label] = votes.get(label, 0.0) + math.exp(sims[i] / t)
        ranked = sorted(votes, key=lambda c: (-votes[c], c))  # ties: the lower class
        correct += ranked[0] == truth
        correct5 += truth in ranked[: min(5, k)]
    return 100.0 * correct / len(test_y), 100.0 * correct5 / len(test_y)


def ref_heads(
    cfg: linear.LinearConfig,
    x: Tensor,
    y: Tensor,
    n_classes: int,
    views: Callable[[int], Tensor] | None = None,
) -> list[list[tuple[Tensor, Tensor]]]:
    """Each (lr, optimizer, wd) head trained on its own with torch.optim.SGD, as the sweep should.

    Shared with the sweep by specification: N(0, 0.01) init of all heads drawn first from a generator
    seeded with ``seed``, then one permutation per epoch from it; cosine lr from lr * batch / 256.
    LARS rescales the decayed weight gradient by lars_eta ||w|| / ||g||; biases get neither decay nor
    LARS. ``views(e)``, when given, are epoch e's train features (augmented). Returns every head's
    (w, b) after every epoch.
    """
    s = cfg.settings()
    grid = [(lr, opt, wd) for lr in s.lrs for opt in s.optimizers for wd in s.weight_decays]
    gen = torch.Generator().manual_seed(cfg.seed)
    w_init = torch.randn(len(grid), x.shape[1], n_classes, generator=gen) * 0.01
    perms = [torch.randperm(len(x), generator=gen) for _ in range(cfg.epochs)]
    epoch_x = [x if views is None else views(e) for e in range(cfg.epochs)]
    total = cfg.epochs * math.ceil(len(x) / cfg.train_batch_size)
    heads = []
    for (lr, opt, wd), w0 in zip(grid, w_init):
        w, b = w0.clone().requires_grad_(True), torch.zeros(n_classes, requires_grad=True)
        groups: list[dict[str, Any]] = [
            {"params": [w], "weight_decay": 0.0 if opt == "lars" else wd},
            {"params": [b]},
        ]
        sgd = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
        step, snapshots = 0, []
        for xe, perm in zip(epoch_x, perms):
            for idx in perm.split(cfg.train_batch_size):
                for g in sgd.param_groups:
                    g["lr"] = lr * cfg.train_batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
                sgd.zero_grad()
                F.cross_entropy(xe[idx] @ w + b, y[idx]).backward()
                if opt == "lars":
                    with torch.no_grad():
                        g_w = w.grad + wd * w
                        w.grad.copy_(g_w * (s.lars_eta * w.norm() / g_w.norm()))
                sgd.step()
                step += 1
            snapshots.append((w.detach().clone(), b.detach().clone()))
        heads.append(snapshots)
    return heads


def ref_linear(
    backbone: Backbone, cfg: linear.LinearConfig, views: Callable[[int], Tensor] | None = None
) -> tuple[dict[str, float], Tensor]:
    """The linear protocol's output and final head weights, from ``ref_features`` and ``ref_heads``.

    The heads are evaluated after the epochs e (0-based) with e % val_every == 0 and the last, as DINO's
    ``val_freq``; the reported (epoch, head) has the best picking top-1, the first head and the earliest
    epoch among equals. ``views``: the run's augmented train features of each epoch.
    """
    s = cfg.settings()
    layers = "last2" if cfg.layers == "auto" else cfg.layers  # the paper's choice for a 2-block ViT-S-like
    x, y = ref_features(backbone, cfg.train_split, cfg.limit, cfg.image_size, layers)
    tx, ty = ref_features(backbone, cfg.test_split, cfg.limit, cfg.image_size, layers)
    n_classes = int(max(y.max(), ty.max())) + 1
    out: dict[str, float] = {}
    others = [tx]
    if cfg.val_fraction > 0:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        n_val = max(1, int(cfg.val_fraction * len(x)))
        val_y = y[perm[:n_val]]
        others.append(x[perm[:n_val]])
        x, y = x[perm[n_val:]], y[perm[n_val:]]
    if s.standardise:
        x, *others = ref_standardise(x, *others)
    heads = ref_heads(cfg, x, y, n_classes, views)
    grid = [(lr, opt, wd) for lr in s.lrs for opt in s.optimizers for wd in s.weight_decays]
    best: tuple[float, int, int, float] | None = None  # (picking top-1, epoch, head, test top-1)
    for e in range(cfg.epochs):
        if e != cfg.epochs - 1 and not (s.val_every > 0 and e % s.val_every == 0):
            continue
        test = [top1(others[0] @ w + b, ty) for w, b in (h[e] for h in heads)]
        pick = (
            test
            if cfg.val_fraction == 0
            else [top1(others[1] @ w + b, val_y) for w, b in (h[e] for h in heads)]
        )
        i = pick.index(max(pick))  # the first of equals, as argmax
        if best is None or pick[i] > best[0]:
            best = (pick[i], e, i, test[i])
    assert best is not None
    if cfg.val_fraction > 0:
        out["linear_val_top1"] = best[0]
    lr, opt, wd = grid[best[2]]
    out.update(
        linear_top1=best[3],
        linear_best_epoch=float(best[1] + 1),
        best_lr=lr,
        best_wd=wd,
        best_is_lars=float(opt == "lars"),
        feature_dim=float(x.shape[1]),
    )
    return out, torch.stack([h[-1][0] for h in heads])


def make_in9(root: Path, per_class: int = 4) -> Path:
    """IN-9-like variants, each with train/ and val/; per-image noise makes every split different."""
    rng = np.random.default_rng(0)
    for variant in ("original", "mixed_same", "mixed_rand"):
        for split in ("train", "val"):
            for cls, fg in COLOURS.items():
                (root / variant / split / cls).mkdir(parents=True)
                for i in range(per_class):
                    typical = np.array((90, 160, 90) if cls == "cat" else (160, 160, 90))
                    bg = rng.integers(0, 256, 3) if variant == "mixed_rand" else typical
                    img = np.clip(bg + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                    img[4:12, 4:12] = fg
                    Image.fromarray(img).save(root / variant / split / cls / f"{i}.png")
    return root


# -------------------------------------------------------------------------------------------- k-NN
def knn_exact(sc: Scenario, row: Row) -> None:
    cfg = sc.cfg(**row.overrides)
    x, y = ref_features(sc.backbone, cfg.train_split, cfg.limit, cfg.image_size)
    tx, ty = ref_features(sc.backbone, cfg.test_split, cfg.limit, cfg.image_size)
    refs = {k: ref_knn(x, y, tx, ty, k, cfg.temperature) for k in cfg.ks}
    expected = {f"knn_top1@{k}": top1 for k, (top1, _) in refs.items()}
    expected |= {f"knn_top5@{k}": top5 for k, (_, top5) in refs.items()}
    assert sc.alt(row)["out"] == expected


def self_match(sc: Scenario, row: Row) -> None:
    """Train and test are the same images: each is its own nearest neighbour (cos 1)."""
    assert sc.alt(row)["out"]["knn_top1@1"] == 100.0
    assert sc.observe()["out"]["knn_top1@1"] < 100.0  # not so on Fashion-MNIST's train vs test


KNN_ROWS = [
    Row("ks", (3, 10), knn_exact),
    Row("temperature", 1.0, every(knn_exact, differs())),
    Row("train_split", "test", every(knn_exact, self_match)),
    Row("test_split", "train", every(knn_exact, self_match)),
    Row("limit", 24, every(knn_exact, differs())),
    Row("image_size", 24, every(knn_exact, differs())),
    Row("in_chans", 3, raises(ValueError, "in_chans")),
    *(folder_row(f, self_match) for f in ("dataset", "path")),
    Row("batch_size", 7, same()),
    Row("device", "auto", same_on_cpu),
    Row("cache_dir", "{tmp}/cache", cache_used),
]


@pytest.fixture(scope="module")
def knn_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("knn")
    make_folder(tmp / "folder")
    backbone = backbone_for(1)
    base = knn.KNNConfig(ks=(1, 5, 20), image_size=16, limit=LIMIT, batch_size=64, device="cpu")
    return Scenario(base, lambda cfg: {"out": knn.run(backbone, cfg)}, backbone, tmp)


@pytest.mark.parametrize("row", KNN_ROWS, ids=str)
def test_knn_option(knn_scenario: Scenario, row: Row) -> None:
    row.check(knn_scenario, row)


# ------------------------------------------------------------------------------------------ linear
def linear_exact(sc: Scenario, row: Row) -> None:
    obs = sc.alt(row)
    out, w = ref_linear(sc.backbone, sc.cfg(**row.overrides), obs["_epochs"])  # the run's own views
    assert obs["out"] == out
    assert close(obs["w"], w, atol=1e-4)


def feature_dim(dim: int) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["out"]["feature_dim"] == dim

    return check


def train_rows(n: int) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["x"].shape[0] == n

    return check


def x_width(dim: int) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["x"].shape[1] == dim

    return check


def head_reads(kind: str) -> Check:
    """The train features reaching the heads are the backbone's own ("raw") or standardised ones."""

    def check(sc: Scenario, row: Row) -> None:
        cfg = sc.cfg(**row.overrides)
        raw, _ = ref_features(sc.backbone, cfg.train_split, cfg.limit, cfg.image_size, cfg.layers)
        expected = raw if kind == "raw" else ref_standardise(raw)[0]
        assert close(sc.alt(row)["x"], expected, atol=1e-4)
        assert not close(raw, ref_standardise(raw)[0], atol=1e-2)  # the two are told apart

    return check


def best_epoch(epoch: int, gain: float) -> Check:
    """The reported head is that of ``epoch``, ``gain`` points above the last epoch's best head, which a
    run evaluating after the last epoch only (the base) reports."""

    def check(sc: Scenario, row: Row) -> None:
        out, last = sc.alt(row)["out"], sc.ref(row)["out"]
        assert out["linear_best_epoch"] == epoch
        assert last["linear_best_epoch"] == sc.cfg(**row.overrides).epochs
        assert out["linear_top1"] - last["linear_top1"] == gain

    return check


def whole_image_views(sc: Scenario, row: Row) -> None:
    """With crops of scale 1 a random-resized crop is the whole image, so every augmented view is an
    image or its mirror (standardised as the clean train features, or raw); smaller crops (the default
    0.08) are neither."""
    cfg = sc.cfg(**row.overrides)
    views = sc.alt(row)["_epochs"](0)
    clean, _ = ref_features(sc.backbone, cfg.train_split, cfg.limit, cfg.image_size, cfg.layers)
    mirror, _ = ref_features(sc.backbone, cfg.train_split, cfg.limit, cfg.image_size, cfg.layers, flip=True)
    if cfg.settings().standardise:
        _, clean, mirror = ref_standardise(clean, clean, mirror)  # the clean train statistics
    err_clean = (views - clean).abs().amax(1)
    err_mirror = (views - mirror).abs().amax(1)
    whole = torch.minimum(err_clean, err_mirror) < 1e-3
    if cfg.crop_scale_min == 1.0:
        assert bool(whole.all()) and bool((err_clean < 1e-3).any()) and bool((err_mirror < 1e-3).any())
    else:
        assert int(whole.sum()) <= len(views) // 4


# The paper's protocol, read off github.com/sthalles/sop evaluation/eval_linear_multi.py and utils.LARS
# (written out here rather than imported, so a changed preset fails this table).
PAPER = {
    "augment": True,  # RandomResizedCrop(224) + RandomHorizontalFlip every epoch
    "standardise": False,  # nn.Linear on the raw tokens
    "val_every": 1,  # --val_freq 1, best_acc over epochs
    "lrs": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5),
    "weight_decays": (0.0, 1e-6),
    "optimizers": ("sgd", "lars"),
    "lars_eta": 1e-3,
}
FAST = {  # today's cached probe, as it was before the presets
    "augment": False,
    "standardise": True,
    "val_every": 0,
    "lrs": (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "weight_decays": (0.0, 1e-6),
    "optimizers": ("sgd", "lars"),
    "lars_eta": 1.0,
}
PRESET_GRID = (("lrs", None), ("weight_decays", None), ("optimizers", None))  # let the preset choose


def preset_is(values: dict[str, Any]) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert asdict(sc.cfg(**row.overrides).settings()) == values

    return check


def heads_grid(sc: Scenario, row: Row) -> None:
    """The heads are the preset's lr x optimizer x wd grid, in that order."""
    s, obs = sc.cfg(**row.overrides).settings(), sc.alt(row)["heads"]
    grid = [(lr, opt, wd) for lr in s.lrs for opt in s.optimizers for wd in s.weight_decays]
    assert obs["lr"].tolist() == [g[0] for g in grid] and obs["wd"].tolist() == [g[2] for g in grid]
    assert obs["is_lars"].tolist() == [g[1] == "lars" for g in grid]


AUGMENTED = (("augment", True), ("image_size", 28))  # native size: the crop is not resampled
WHOLE = (*AUGMENTED, ("crop_scale_min", 1.0))
DECLINING = (("epochs", 4), ("seed", 2))

LINEAR_ROWS = [
    Row("preset", "paper", every(preset_is(PAPER), heads_grid, linear_exact, head_reads("raw")), PRESET_GRID),
    Row("preset", "paper", whole_image_views, (("image_size", 28), ("crop_scale_min", 1.0))),  # raw views
    Row("preset", "fast", every(preset_is(FAST), heads_grid, linear_exact), PRESET_GRID),
    Row("preset", "paper", raises(ValueError, "val_fraction"), (("val_fraction", 0.25),)),
    Row("preset", "slow", raises(ValueError, "preset")),
    Row("layers", "last2", every(linear_exact, feature_dim(64))),
    Row("layers", "cls+avgpool", every(linear_exact, feature_dim(64))),
    Row("layers", "auto", every(linear_exact, feature_dim(64))),  # vit_test is narrow: last2
    Row("lrs", (0.5,), every(linear_exact, differs("w"))),
    Row("weight_decays", (0.0, 0.05), linear_exact),
    Row("optimizers", ("sgd", "lars"), linear_exact),
    Row("lars_eta", 1e-3, every(linear_exact, differs("w")), (("optimizers", ("sgd", "lars")),)),
    Row("lars_eta", 1e-3, same()),  # SGD heads have no trust ratio
    Row("lars_eta", 0.0, raises(ValueError, "lars_eta")),
    Row("standardise", False, every(linear_exact, head_reads("raw"), differs("w"))),
    Row("standardise", True, every(linear_exact, head_reads("std")), (("preset", "paper"),)),
    Row("standardise", False, whole_image_views, WHOLE),
    # seed 2, 4 epochs: the best head's top-1 after each epoch is 15, 27.5, 25, 25
    Row("val_every", 1, every(linear_exact, best_epoch(2, 2.5)), DECLINING),
    Row("val_every", 2, every(linear_exact, best_epoch(3, 0.0)), DECLINING),  # after 1, 3, 4; a tie keeps 3
    Row("val_every", 1, every(linear_exact, differs()), (*DECLINING, ("val_fraction", 0.25))),
    Row("val_every", -1, raises(ValueError, "val_every")),
    Row("momentum", 0.0, every(linear_exact, differs("w"))),
    Row("epochs", 3, every(linear_exact, differs("w"))),
    Row("train_batch_size", 8, every(linear_exact, differs("w"))),
    Row("val_fraction", 0.25, linear_exact),
    Row("seed", 1, every(linear_exact, differs("w"))),
    Row("augment", True, every(differs("w"), reproducible, whole_image_views), AUGMENTED[1:]),
    Row("augment", False, every(linear_exact, head_reads("raw")), (("preset", "paper"),)),
    Row("crop_scale_min", 1.0, same()),  # only the augmented path crops
    Row("crop_scale_min", 1.0, whole_image_views, AUGMENTED),
    Row("train_split", "test", linear_exact),
    Row("train_split", "test", whole_image_views, WHOLE),
    Row("test_split", "train", linear_exact),
    Row("limit", 24, every(linear_exact, train_rows(24))),
    Row("limit", 24, whole_image_views, WHOLE),
    Row("image_size", 24, every(linear_exact, differs("w"))),
    Row("image_size", 28, whole_image_views, (("augment", True), ("crop_scale_min", 1.0))),
    Row("in_chans", 3, raises(ValueError, "in_chans")),
    *(folder_row(f, train_rows(8)) for f in ("dataset", "path")),
    Row("batch_size", 7, same()),
    # Augmented views are seeded per (seed, epoch, image), so the extraction batch must not change them
    # (tests/eval/test_linear.py checks random crops; here whole crops of the folder's images).
    Row("batch_size", 7, same(), (("augment", True), ("crop_scale_min", 1.0), *FOLDER)),
    Row("device", "auto", same_on_cpu),
    Row("cache_dir", "{tmp}/cache", cache_used),
]


@pytest.fixture(scope="module")
def linear_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("linear")
    make_folder(tmp / "folder")
    backbone = backbone_for(1)

    def observe(cfg: linear.LinearConfig) -> Obs:
        calls: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, linear, "train_linear_heads", calls)
            out = linear.run(backbone, cfg)
        (args, heads) = calls[0]
        grid = {"lr": heads.lr, "wd": heads.wd, "is_lars": heads.is_lars}
        return {
            "out": out,
            "x": args[0],
            "w": heads.weight,
            "b": heads.bias,
            "heads": grid,
            "_epochs": args[4],
        }

    base = linear.LinearConfig(
        layers="cls",
        lrs=(0.03, 0.3),
        weight_decays=(0.0,),
        optimizers=("sgd",),
        epochs=2,
        train_batch_size=16,
        image_size=16,
        limit=LIMIT,
        device="cpu",
    )
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", LINEAR_ROWS, ids=str)
def test_linear_option(linear_scenario: Scenario, row: Row) -> None:
    row.check(linear_scenario, row)


# ------------------------------------------------------------------------------------------ logreg
def objective_grad(x: Tensor, y: Tensor, w: Tensor, b: Tensor, c: float) -> Tensor:
    """Gradient of the documented objective, mean CE + ||W||^2 / (2 c N), at (w, b), flattened."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ w + b, y) + w.square().sum() / (2 * c * len(x))
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (w, b))])


def logreg_exact(sc: Scenario, row: Row) -> None:
    """The fit sees the standardised features of the labelled subset, and top-1 is its test accuracy."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    x, y = ref_features(sc.backbone, cfg.train_split, cfg.limit, cfg.image_size, cfg.layers)
    tx, ty = ref_features(sc.backbone, cfg.test_split, cfg.limit, cfg.image_size, cfg.layers)
    idx = obs["idx"]
    x, tx = ref_standardise(x[idx], tx)
    assert close(obs["x"], x, atol=1e-4) and torch.equal(obs["y"], y[idx])
    expected = {"logreg_top1": top1(tx @ obs["w"] + obs["b"], ty), "logreg_train_size": float(len(idx))}
    assert obs["out"] == expected


def stationary(sc: Scenario, row: Row) -> None:
    """The fit is the optimum of the objective with the configured c, not with another c."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    grad = objective_grad(obs["x"], obs["y"], obs["w"], obs["b"], cfg.c).abs().max()
    wrong = objective_grad(obs["x"], obs["y"], obs["w"], obs["b"], 2 * cfg.c).abs().max()
    assert float(grad) < 1e-3 < float(wrong)


def majority_vote(sc: Scenario, row: Row) -> None:
    """c -> 0 shrinks W to 0; the unregularised bias then predicts the most frequent train class."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    _, y = load_fashion_mnist(cfg.train_split, limit=cfg.limit)
    _, ty = load_fashion_mnist(cfg.test_split, limit=cfg.limit)
    assert obs["out"]["logreg_top1"] == 100.0 * int((ty == torch.bincount(y).argmax()).sum()) / len(ty)
    assert float(obs["w"].norm()) < float(sc.observe()["w"].norm())


def one_lbfgs_step(sc: Scenario, row: Row) -> None:
    """One L-BFGS iteration from zero is a line search along the negative initial gradient."""
    obs = sc.alt(row)
    start = objective_grad(obs["x"], obs["y"], torch.zeros_like(obs["w"]), torch.zeros_like(obs["b"]), 1.0)
    step = torch.cat([obs["w"].flatten(), obs["b"]])
    assert float(F.cosine_similarity(step, -start, dim=0)) > 1 - 1e-5
    full = sc.observe()  # while the converged default has moved off that line
    assert float(F.cosine_similarity(torch.cat([full["w"].flatten(), full["b"]]), -start, dim=0)) < 0.99


def subset_of(indices: list[int]) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["idx"].tolist() == indices

    return check


def balanced_half(sc: Scenario, row: Row) -> None:
    """Half of each class (rounded, at least one), so the train size follows from the class counts."""
    cfg, obs = sc.cfg(**row.overrides), sc.alt(row)
    _, y = load_fashion_mnist(cfg.train_split, limit=cfg.limit)
    counts = torch.bincount(y).tolist()
    assert torch.bincount(obs["y"], minlength=len(counts)).tolist() == [max(1, round(n / 2)) for n in counts]


LOGREG_ROWS = [
    Row("layers", "last2", every(logreg_exact, x_width(64))),
    Row("c", 1e-6, every(logreg_exact, majority_vote)),
    Row("c", 0.05, every(logreg_exact, stationary, differs("w"))),
    Row("max_iter", 1, every(logreg_exact, one_lbfgs_step)),
    Row("subset_file", "{tmp}/subset.txt", every(logreg_exact, subset_of([0, 3, 17, 25]))),
    Row("subset_fraction", 0.5, every(logreg_exact, balanced_half)),
    Row("seed", 1, same()),  # without a fractional subset nothing is drawn
    Row("seed", 1, every(logreg_exact, balanced_half, differs("idx")), (("subset_fraction", 0.5),)),
    Row("train_split", "test", every(logreg_exact, differs())),
    Row("test_split", "train", every(logreg_exact, differs())),
    Row("limit", 24, every(logreg_exact, subset_of(list(range(24))))),
    Row("image_size", 24, every(logreg_exact, differs("x"))),
    Row("in_chans", 3, raises(ValueError, "in_chans")),
    *(folder_row(f, subset_of(list(range(8)))) for f in ("dataset", "path")),
    Row("batch_size", 7, same(atol=1e-4)),
    Row("device", "auto", same_on_cpu),
    Row("cache_dir", "{tmp}/cache", cache_used),
]


@pytest.fixture(scope="module")
def logreg_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("logreg")
    make_folder(tmp / "folder")
    (tmp / "subset.txt").write_text("3\n0\n17\n3\n25\n")  # unsorted, with a repeat
    backbone = backbone_for(1)

    def observe(cfg: logreg.LogRegConfig) -> Obs:
        fits: list[tuple[tuple[Any, ...], Any]] = []
        subsets: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, logreg, "fit_logreg", fits)
            spy(mp, logreg, "low_shot_indices", subsets)
            out = logreg.run(backbone, cfg)
        (x, y, *_), (w, b) = fits[0]
        return {"out": out, "x": x, "y": y, "w": w, "b": b, "idx": subsets[0][1]}

    base = logreg.LogRegConfig(layers="cls", image_size=16, limit=LIMIT, max_iter=100, device="cpu")
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", LOGREG_ROWS, ids=str)
def test_logreg_option(logreg_scenario: Scenario, row: Row) -> None:
    row.check(logreg_scenario, row)


# -------------------------------------------------------------------------------------- robustness
def heads_are(attr: str, expected: list[float]) -> Check:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["heads"][attr].tolist() == expected

    return check


def head_config(sc: Scenario, row: Row) -> None:
    """The head sweep is the linear protocol's (pinned above): the field must reach its config."""
    assert getattr(sc.alt(row)["_head_cfg"], row.field) == row.value


def reported_variants(sc: Scenario, row: Row) -> None:
    """Only the listed variants are scored, by the same head as before (its training never sees them)."""
    alt, ref = sc.alt(row)["out"], sc.ref(row)["out"]
    assert set(alt) == {f"robustness_top1_{v}" for v in row.value}  # no BG-gap without mixed_same
    assert all(alt[k] == ref[k] for k in alt)


def reads(*pairs: tuple[str, str]) -> Check:
    """The (variant, split) folders the run extracted: the train variant's train split, every val."""

    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["reads"] == sorted(pairs)

    return check


def one_class(sc: Scenario, row: Row) -> None:
    """The first 4 files of each split are all cats (folders sort): one class, always right."""
    out = sc.alt(row)["out"]
    assert sc.alt(row)["x"].shape[0] == 4
    assert all(out[f"robustness_top1_{v}"] == 100.0 for v in sc.base.variants)
    assert out["robustness_bg_gap"] == 0.0


VAL = (("original", "val"), ("mixed_same", "val"), ("mixed_rand", "val"))

ROBUSTNESS_ROWS = [
    Row("variants", ("original", "mixed_rand"), reported_variants),
    Row(
        "train_variant",
        "mixed_same",
        every(reads(*VAL, ("mixed_same", "train")), differs("x"), differs("w")),
    ),
    Row("layers", "last2", x_width(64)),
    Row("lrs", (0.5,), every(heads_are("lr", [0.5]), differs("w"))),
    Row("weight_decays", (0.0, 0.1), heads_are("wd", [0.0, 0.1, 0.0, 0.1])),
    Row("optimizers", ("sgd", "lars"), heads_are("is_lars", [False, True, False, True])),
    Row("epochs", 3, every(head_config, differs("w"))),
    Row("train_batch_size", 4, every(head_config, differs("w"))),
    Row("seed", 1, every(head_config, differs("w"))),
    Row("dataset", "fashion_mnist", raises(ValueError, "dataset")),
    Row("path", "{tmp}/nowhere", raises(ValueError, "nowhere")),
    Row("train_split", "val", every(reads(*VAL, ("original", "val")), differs("x"))),
    Row("test_split", "train", reads(*((v, "train") for v, _ in VAL), ("original", "train"))),
    Row("image_size", 24, differs("x")),
    Row("in_chans", 1, raises(ValueError, "in_chans")),
    Row("limit", 4, one_class),
    Row("batch_size", 3, same()),
    Row("device", "auto", same_on_cpu),
    Row("cache_dir", "{tmp}/cache", cache_used),
]


@pytest.fixture(scope="module")
def robustness_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("robustness")
    backbone = backbone_for(3)

    def observe(cfg: robustness.RobustnessConfig) -> Obs:
        calls: list[tuple[tuple[Any, ...], Any]] = []
        extractions: list[tuple[tuple[Any, ...], Any]] = []
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, robustness, "train_linear_heads", calls)
            spy(mp, robustness, "variant_features", extractions)
            out = robustness.run(backbone, cfg)
        (x, _, _, head_cfg), heads = calls[0]
        kinds = {"lr": heads.lr, "wd": heads.wd, "is_lars": heads.is_lars}
        read = sorted((variant, split) for (_, _, variant, split), _ in extractions)
        return {"out": out, "x": x, "w": heads.weight, "heads": kinds, "reads": read, "_head_cfg": head_cfg}

    base = robustness.RobustnessConfig(
        path=str(make_in9(tmp / "in9")),
        image_size=16,
        variants=("original", "mixed_same", "mixed_rand"),
        lrs=(0.01, 0.1),
        epochs=5,
        train_batch_size=8,
        device="cpu",
    )
    return Scenario(base, observe, backbone, tmp)


@pytest.mark.parametrize("row", ROBUSTNESS_ROWS, ids=str)
def test_robustness_option(robustness_scenario: Scenario, row: Row) -> None:
    row.check(robustness_scenario, row)


TABLES = {
    "knn": (knn.KNNConfig, KNN_ROWS),
    "linear": (linear.LinearConfig, LINEAR_ROWS),
    "logreg": (logreg.LogRegConfig, LOGREG_ROWS),
    "robustness": (robustness.RobustnessConfig, ROBUSTNESS_ROWS),
}
