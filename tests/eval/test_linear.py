import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sopvit.config import load_config
from sopvit.eval.cache import extract_dataset_features, resolve_layers
from sopvit.eval.linear import (
    BestEpoch,
    LinearConfig,
    LinearHeads,
    augmented_epochs,
    lars_sgd_step,
    run,
    standardise,
    train_linear_heads,
)
from sopvit.eval.linear_presets import PRESETS
from sopvit.models import create_backbone

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "eval"


def test_lars_and_sgd_step_by_hand() -> None:
    # heads: SGD, LARS, SGD with wd 0.5; all start at w = (3, 4), grad = (0, 1), lr 0.1
    w = torch.tensor([[3.0, 4.0]] * 3)
    grad = torch.tensor([[0.0, 1.0]] * 3)
    buf = torch.zeros_like(w)
    lr, wd = torch.full((3,), 0.1), torch.tensor([0.0, 0.0, 0.5])
    lars = torch.tensor([False, True, False])
    lars_sgd_step(w, grad, buf, lr, wd, 0.9, lars)
    # LARS: trust ||w|| / ||g|| = 5 / 1 -> step 0.1 * 5 * (0, 1); wd: g = (0, 1) + 0.5 (3, 4) = (1.5, 3)
    expected = torch.tensor([[3.0, 3.9], [3.0, 3.5], [2.85, 3.7]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(buf, torch.tensor([[0.0, 1.0], [0.0, 5.0], [1.5, 3.0]]))
    # second SGD step with momentum: buf = 0.9 * 1 + 1 = 1.9
    lars_sgd_step(w[:1], grad[:1], buf[:1], lr[:1], wd[:1], 0.9, lars[:1])
    torch.testing.assert_close(w[0], torch.tensor([3.0, 3.9 - 0.19]))


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = (x @ torch.randn(16, 3, generator=torch.Generator().manual_seed(99))).argmax(1)
    return x, y


def test_sweep_learns_separable_features() -> None:
    x, y = _separable(600, 0)
    tx, ty = _separable(300, 1)
    x, tx = standardise(x, tx)
    cfg = LinearConfig(lrs=(1e-4, 1e-1, 1.0), epochs=30, train_batch_size=64)
    heads = train_linear_heads(x, y, 3, cfg)
    assert heads.weight.shape == (12, 16, 3)
    acc = heads.accuracies(tx, ty)
    best = int(acc.argmax())
    assert float(acc[best]) >= 95.0
    # the tiny learning rate barely moves from the random init: it must not win
    assert float(heads.lr[best]) > 1e-4
    assert float(acc[heads.lr == 1e-4].max()) < float(acc[best])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="optimizers"):
        LinearConfig(optimizers=("adam",)).validate()
    with pytest.raises(ValueError, match="layers"):
        LinearConfig(layers="mean").validate()
    with pytest.raises(ValueError, match="epochs"):
        LinearConfig(epochs=0).validate()


@pytest.mark.parametrize(("layers", "val_fraction"), [("last2", 0.0), ("cls+avgpool", 0.2)])
def test_run_on_fashion_mnist(tmp_path: Path, layers: str, val_fraction: float) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    cfg = LinearConfig(
        layers=layers,
        lrs=(1e-3, 1e-1),
        epochs=3,
        train_batch_size=64,
        val_fraction=val_fraction,
        limit=300,
        device="cpu",
        cache_dir=str(tmp_path),
    )
    out = run(backbone, cfg)
    assert 0 <= out["linear_top1"] <= 100 and math.isfinite(out["linear_top1"])
    assert out["best_lr"] in (1e-3, 1e-1) and out["best_wd"] in (0.0, 1e-6) and out["best_is_lars"] in (0, 1)
    assert ("linear_val_top1" in out) == (val_fraction > 0)


def test_augmented_epochs_are_fresh_views_and_reproducible() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    cfg = LinearConfig(layers="cls", image_size=16, limit=40, device="cpu", augment=True, seed=3)
    clean, _ = extract_dataset_features(backbone, "fashion_mnist", None, "train", 16, 1, 64, 40, CPU, "cls")
    epochs = augmented_epochs(backbone, cfg, clean)
    first, second, again = epochs(0), epochs(1), augmented_epochs(backbone, cfg, clean)(0)
    assert first.shape == clean.shape
    assert not torch.allclose(first, second)  # a new crop of every image each epoch
    torch.testing.assert_close(first, again)  # ... but the same crops when rerun with the seed
    # standardised with the clean statistics: augmented views stay on the same scale
    assert abs(float(first.mean())) < 0.5 and 0.5 < float(first.std()) < 2.0


def test_augmented_run_and_its_config_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    cfg = LinearConfig(
        layers="last2", lrs=(1e-2,), epochs=2, image_size=16, limit=100, device="cpu", augment=True
    )
    out = run(backbone, cfg)
    assert 0 <= out["linear_top1"] <= 100
    with pytest.raises(ValueError, match="val_fraction"):
        LinearConfig(augment=True, val_fraction=0.1).validate()
    with pytest.raises(ValueError, match="layers='last4' needs 4 blocks; this backbone has 2"):
        run(backbone, LinearConfig(layers="last4", image_size=16, limit=10, device="cpu"))


def test_auto_layers_follow_the_paper_per_architecture() -> None:
    assert resolve_layers("auto", create_backbone("vit_small_patch16_224", img_size=32)) == "last4"
    assert resolve_layers("auto", create_backbone("vit_base_patch16_224", img_size=32)) == "cls+avgpool"
    assert resolve_layers("auto", create_backbone("vit_test", img_size=16, in_chans=1)) == "last2"
    assert resolve_layers("last1", create_backbone("vit_test", img_size=16, in_chans=1)) == "last1"
    with pytest.raises(ValueError, match="layers"):
        LinearConfig(layers="abcd4").validate()


def test_augmented_views_do_not_depend_on_the_batch_size() -> None:
    # each image's crop is seeded by (seed, epoch, image): not by which loader worker drew it first
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    clean, _ = extract_dataset_features(backbone, "fashion_mnist", None, "train", 16, 1, 64, 40, CPU, "cls")
    views = [
        augmented_epochs(
            backbone,
            LinearConfig(layers="cls", image_size=16, limit=40, device="cpu", augment=True, batch_size=b),
            clean,
        )(1)
        for b in (7, 64)
    ]
    torch.testing.assert_close(views[0], views[1], atol=1e-5, rtol=1e-5)


def test_presets_resolve_and_a_set_field_wins() -> None:
    fast = LinearConfig().settings()  # the default: the cached-feature probe, as before the presets
    assert fast == PRESETS["fast"]
    assert (fast.augment, fast.standardise, fast.val_every, fast.lars_eta) == (False, True, 0, 1.0)
    paper = LinearConfig(preset="paper").settings()
    assert (paper.augment, paper.standardise, paper.val_every, paper.lars_eta) == (True, False, 1, 1e-3)
    assert len(paper.lrs) * len(paper.weight_decays) * len(paper.optimizers) == 52
    mixed = LinearConfig(preset="paper", lrs=(0.1,), standardise=True).settings()
    assert mixed == replace(PRESETS["paper"], lrs=(0.1,), standardise=True)


def test_preset_fields_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="preset: must be one of 'fast', 'paper'"):
        LinearConfig(preset="slow").validate()
    with pytest.raises(ValueError, match="val_every"):
        LinearConfig(val_every=-1).validate()
    with pytest.raises(ValueError, match="lars_eta"):
        LinearConfig(lars_eta=0.0).validate()
    with pytest.raises(ValueError, match=r"val_fraction: must be 0 with augment \(on in preset 'paper'\)"):
        LinearConfig(preset="paper", val_fraction=0.1).validate()
    LinearConfig(
        preset="paper", augment=False, val_fraction=0.1
    ).validate()  # no crops: a held-out split is fine


@pytest.mark.parametrize(("arch", "layers"), [("small", "last4"), ("base", "cls+avgpool")])
def test_imagenet_recipes_run_the_paper_preset(arch: str, layers: str) -> None:
    path = RECIPES / f"linear_vit_{arch}_in1k.yaml"
    cfg = load_config(LinearConfig, path)
    assert cfg.preset == "paper" and cfg.settings() == PRESETS["paper"] and cfg.layers == layers
    assert (cfg.epochs, cfg.train_batch_size, cfg.momentum, cfg.crop_scale_min) == (100, 1024, 0.9, 0.08)
    # one override switches every value the preset controls (the recipe leaves them to the preset)
    assert load_config(LinearConfig, path, ["preset=fast"]).settings() == PRESETS["fast"]


def test_lars_trust_coefficient_by_hand() -> None:
    w, grad, buf = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)
    lars_sgd_step(w, grad, buf, torch.tensor([0.1]), torch.zeros(1), 0.9, torch.tensor([True]), eta=1e-3)
    # trust 1e-3 * ||w|| / ||g|| = 1e-3 * 5 / 1: a step of 0.1 * 0.005 along (0, 1)
    torch.testing.assert_close(w, torch.tensor([[3.0, 4.0 - 5e-4]]))


def _heads_predicting(*classes: int) -> LinearHeads:
    """Heads that predict a fixed class each (through the bias), with lrs 0.1, 0.2 and SGD, LARS."""
    bias = F.one_hot(torch.tensor(classes), 2).float()
    lr, wd = torch.tensor([0.1, 0.2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    return LinearHeads(torch.zeros(2, 1, 2), bias, lr, wd, torch.tensor([False, True]))


@pytest.mark.parametrize(
    ("val_every", "expected"),
    [
        # evaluated after epochs 1, 3, 5: head 1 reaches 75 after 3; after 5 head 0 ties it, the earlier stays
        (2, {"linear_top1": 75.0, "linear_best_epoch": 3.0, "best_lr": 0.2, "best_is_lars": 1.0}),
        # after every epoch: head 1 already reaches 75 after epoch 2
        (1, {"linear_top1": 75.0, "linear_best_epoch": 2.0, "best_lr": 0.2, "best_is_lars": 1.0}),
        # after the last epoch only: the first of the equal heads there
        (0, {"linear_top1": 75.0, "linear_best_epoch": 5.0, "best_lr": 0.1, "best_is_lars": 0.0}),
    ],
)
def test_best_epoch_bookkeeping_by_hand(val_every: int, expected: dict[str, float]) -> None:
    x, y = torch.ones(4, 1), torch.tensor([0, 0, 0, 1])  # predicting class 0: 75 %, class 1: 25 %
    best = BestEpoch((x, y), None, epochs=5, val_every=val_every)
    for epoch, classes in enumerate([(1, 1), (1, 0), (1, 0), (0, 1), (0, 0)]):
        best(epoch, _heads_predicting(*classes))
    assert best.out == {**expected, "best_wd": 0.0}
