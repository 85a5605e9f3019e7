import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from torchvision.transforms import v2

from sopvit.config import ConfigError
from sopvit.data.eval_transforms import EvalTransform, SupervisedTrainTransform, TimmRandAugment
from sopvit.eval import finetune
from sopvit.eval.finetune import FinetuneConfig, run
from sopvit.eval.finetune_model import Classifier, param_groups, set_drop_path
from sopvit.eval.subsets import low_shot_indices
from sopvit.models import create_backbone


def test_layer_decay_groups() -> None:
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)  # depth 2
    model = Classifier(backbone, 10)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    m = "backbone.model."
    assert scale[id(named[m + "blocks.0.attn.qkv.weight"])] == 0.5**2
    assert scale[id(named[m + "blocks.1.mlp.fc1.weight"])] == 0.5**1
    assert scale[id(named[m + "patch_embed.proj.weight"])] == 0.5**3
    assert scale[id(named[m + "cls_token"])] == scale[id(named["backbone.mask_token"])] == 0.5**3
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named[m + "norm.weight"])] == 1.0
    for name in ("head.bias", m + "blocks.0.norm1.weight", m + "cls_token", m + "pos_embed"):
        assert wd[id(named[name])] == 0.0, name
    assert wd[id(named[m + "blocks.0.attn.qkv.weight"])] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_drop_path_linear() -> None:
    backbone = create_backbone("vit_test", depth=5)
    rates = set_drop_path(backbone, 0.2)
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    got = [b.drop_path1.drop_prob for b in backbone.model.blocks if isinstance(b.drop_path1, DropPath)]
    assert got == pytest.approx(rates[1:])  # rate 0 keeps timm's Identity
    set_drop_path(backbone, 0.4)
    assert backbone.model.blocks[-1].drop_path2.drop_prob == pytest.approx(0.4)


def test_low_shot_subset_sizes() -> None:
    labels = torch.arange(1000) % 10
    idx = low_shot_indices(labels, None, 0.01, seed=0)
    assert idx.numel() == 10 and torch.bincount(labels[idx]).tolist() == [1] * 10
    assert low_shot_indices(labels, None, 0.1, seed=0).numel() == 100
    assert low_shot_indices(labels, None, None, seed=0).numel() == 1000


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneConfig(layer_decay=0.0).validate()
    with pytest.raises(ValueError, match="subset_file"):
        FinetuneConfig(subset_file="a", subset_fraction=0.1).validate()
    bad: list[tuple[str, Any, str]] = [
        ("auto_augment", "original", "not a timm RandAugment string"),
        ("auto_augment", "rand-m9-x3", "timm cannot parse"),
        ("auto_augment", "rand-m9.5", "timm cannot parse"),
        ("reprob", 1.5, "must be in"),
        ("train_interpolation", "nearest", "bilinear, bicubic"),
        ("eval_interpolation", "lanczos", "bilinear, bicubic"),
        ("eval_every", 0, ">= 1"),
    ]
    for field, value, message in bad:
        with pytest.raises(ConfigError, match=message) as info:
            FinetuneConfig(**{field: value}).validate()
        assert info.value.key == field
    FinetuneConfig(auto_augment=None, reprob=0.0).validate()
    FinetuneConfig(auto_augment="rand-m7-n3-mstd1-inc0", in_chans=3).validate()


def test_defaults_follow_beit() -> None:
    """BEiT's run_class_finetuning.py defaults, as iBOT's run.sh runs them."""
    cfg = FinetuneConfig()
    assert (cfg.auto_augment, cfg.reprob) == ("rand-m9-mstd0.5-inc1", 0.25)
    assert (cfg.train_interpolation, cfg.eval_interpolation) == ("bicubic", "bilinear")
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.drop_path) == (4e-3, 1e-6, 0.05, 0.1)
    assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.crop_scale_min, cfg.eval_every) == (
        0.8,
        1.0,
        0.1,
        0.08,
        1,
    )


def test_train_transform_matches_timm_create_transform() -> None:
    """crop (bicubic) -> flip -> timm RandAugment -> normalise -> RandomErasing('pixel', 1 box), as timm's
    create_transform orders them; RGB and grey images alike (the fill colour has one entry per channel)."""
    for in_chans in (1, 3):
        tf = SupervisedTrainTransform(
            16, in_chans, auto_augment="rand-m9-mstd0.5-inc1", reprob=1.0, interpolation="bicubic"
        )
        kinds = [type(t) for t in tf.pipeline.transforms]
        assert kinds == [
            v2.RandomResizedCrop,
            v2.RandomHorizontalFlip,
            TimmRandAugment,
            v2.ToDtype,
            v2.Normalize,
            RandomErasing,
        ]
        assert tf.pipeline.transforms[0].interpolation == v2.InterpolationMode.BICUBIC
        ra = tf.pipeline.transforms[2]
        assert ra.hparams["translate_const"] == 7 and len(ra.hparams["img_mean"]) == in_chans
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        images = torch.randint(0, 256, (20, in_chans, 28, 28), dtype=torch.uint8)
        out = torch.stack([tf(x) for x in images])
        assert out.shape == (20, in_chans, 16, 16) and out.dtype == torch.float32
    # the augmented linear probe's call: positional torchvision RandAugment pair, bilinear crops, no extras
    plain = SupervisedTrainTransform(16, 1, 0, 0, (0.2, 1.0))
    assert [type(t) for t in plain.pipeline.transforms] == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ToDtype,
        v2.Normalize,
    ]
    assert plain.pipeline.transforms[0].interpolation == v2.InterpolationMode.BILINEAR
    with pytest.raises(ValueError, match="one of them"):
        SupervisedTrainTransform(16, 1, 2, 9, auto_augment="rand-m9")
    with pytest.raises(ValueError, match="reprob"):
        SupervisedTrainTransform(16, 1, reprob=-0.1)
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(16, interpolation="area")
    assert EvalTransform(16, interpolation="bilinear").interpolation == v2.InterpolationMode.BILINEAR


def test_rand_augment_posterizes_to_black_at_magnitude_10() -> None:
    """timm keeps 0 bits at magnitude 10 ('mstd0.5' around 9 gets there); Pillow 13 refuses that, the
    reference's Pillow returned a black image, and so does this transform."""
    for config, name in (
        ("rand-m10-mstd0-p1.0-inc1", "PosterizeIncreasing"),
        ("rand-m0-mstd0-p1.0", "Posterize"),
    ):
        ra = TimmRandAugment(config, 16, (0.5,))
        (op,) = [op for op in ra.augment.ops if op.name == name]
        img = Image.fromarray(np.full((16, 16), 200, dtype=np.uint8))
        assert np.asarray(op(img)).max() == 0
    kept = TimmRandAugment("rand-m5-mstd0-p1.0-inc1", 16, (0.5,))  # 2 bits kept: 200 -> 192
    (op,) = [op for op in kept.augment.ops if op.name == "PosterizeIncreasing"]
    assert np.asarray(op(Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)))).max() == 192


def test_reports_last_and_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune_top1 is the last evaluation, finetune_best_* the first epoch at the highest (as BEiT's)."""
    scripted = iter([50.0, 70.0, 60.0, 70.0])
    monkeypatch.setattr(finetune, "evaluate", lambda *args: next(scripted))
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    cfg = FinetuneConfig(image_size=16, limit=16, epochs=4, train_batch_size=8, num_workers=0, device="cpu")
    out = run(backbone, cfg)
    assert (out["finetune_top1"], out["finetune_best_top1"], out["finetune_best_epoch"]) == (70.0, 70.0, 2.0)
    scripted = iter([50.0, 70.0])  # eval_every=2: after epochs 2 and 4
    out = run(backbone, FinetuneConfig(**{**vars(cfg), "eval_every": 2}))
    assert (out["finetune_top1"], out["finetune_best_top1"], out["finetune_best_epoch"]) == (70.0, 70.0, 4.0)


@pytest.mark.parametrize("mix", [True, False])
def test_run_fashion_mnist_slice(mix: bool) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = FinetuneConfig(
        image_size=16,
        limit=256,
        epochs=1,
        warmup_epochs=0.5,
        train_batch_size=32,
        num_workers=0,
        device="cpu",
        mixup=0.8 if mix else 0.0,
        cutmix=1.0 if mix else 0.0,
        subset_fraction=None if mix else 0.5,
    )
    out = run(backbone, cfg)
    assert math.isfinite(out["finetune_top1"]) and 0 <= out["finetune_top1"] <= 100
    assert out["finetune_best_top1"] >= out["finetune_top1"] and out["finetune_best_epoch"] == 1.0
    assert out["finetune_train_size"] == (256 if mix else pytest.approx(128, abs=10))
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, DropPath) for m in backbone.modules())
