import math

import pytest
import torch
from timm.layers import DropPath

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
    assert scale[id(named[m + "cls_token"])] == 0.5**3
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
    assert out["finetune_train_size"] == (256 if mix else pytest.approx(128, abs=10))
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, DropPath) for m in backbone.modules())
