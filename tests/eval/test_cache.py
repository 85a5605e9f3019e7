from pathlib import Path

import pytest
import torch

from sopvit.eval.cache import (
    EvalDataConfig,
    backbone_fingerprint,
    cached_features,
    extract_dataset_features,
    split_features,
)
from sopvit.models import create_backbone


class Counter:
    def __init__(self, value: float = 1.0) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return torch.full((4, 3), self.value), torch.arange(4)


def test_hit_and_invalidation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    key = {"dataset": "x", "image_size": 28}
    compute = Counter()
    first = cached_features(backbone, key, compute, str(tmp_path))
    second = cached_features(backbone, key, compute, str(tmp_path))
    assert compute.calls == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # other preprocessing: recompute
    cached_features(backbone, {**key, "image_size": 32}, compute, str(tmp_path))
    assert compute.calls == 2
    # one weight nudged by one ulp: another checkpoint, never the old features
    with torch.no_grad():
        p = next(backbone.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(10.0))
    other = Counter(2.0)
    feats, _ = cached_features(backbone, key, other, str(tmp_path))
    assert other.calls == 1 and float(feats[0, 0]) == 2.0
    # no cache dir: always computed
    cached_features(backbone, key, compute, None)
    cached_features(backbone, key, compute, None)
    assert compute.calls == 4


def test_fingerprint_depends_on_weights_only_through_content() -> None:
    torch.manual_seed(0)
    a = create_backbone("vit_test", img_size=28, in_chans=1)
    torch.manual_seed(0)
    b = create_backbone("vit_test", img_size=28, in_chans=1)
    torch.manual_seed(1)
    c = create_backbone("vit_test", img_size=28, in_chans=1)
    assert backbone_fingerprint(a) == backbone_fingerprint(b) != backbone_fingerprint(c)


def test_extract_layers_and_order() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    cpu = torch.device("cpu")
    args = ("fashion_mnist", None, "test", 28, 1)
    cls, labels = extract_dataset_features(backbone, *args, 16, 40, cpu, "cls")
    assert cls.shape == (40, 32) and labels.shape == (40,)
    # batch size must not change the features nor their order
    cls_b, labels_b = extract_dataset_features(backbone, *args, 7, 40, cpu, "cls")
    torch.testing.assert_close(cls, cls_b, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, labels_b)
    last2, _ = extract_dataset_features(backbone, *args, 16, 40, cpu, "last2")
    assert last2.shape == (40, 64)
    torch.testing.assert_close(last2[:, 32:], cls, atol=1e-5, rtol=1e-5)  # last block's [CLS] = final [CLS]
    pooled, _ = extract_dataset_features(backbone, *args, 16, 40, cpu, "cls+avgpool")
    assert pooled.shape == (40, 64)
    with pytest.raises(ValueError, match="layers"):
        extract_dataset_features(backbone, *args, 16, 40, cpu, "mean")


def test_split_features_writes_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    cfg = EvalDataConfig(limit=20, device="cpu", cache_dir=str(tmp_path / "c"))
    feats, _ = split_features(backbone, cfg, "train", "cls")
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1
    again, _ = split_features(backbone, cfg, "train", "cls")
    assert torch.equal(feats, again)
    split_features(backbone, cfg, "train", "last2")
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2


def test_non_finite_weights_are_named_not_evaluated() -> None:
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    with torch.no_grad():
        backbone.model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="10 of 10 feature rows of split 'test' are NaN or Inf"):
        extract_dataset_features(backbone, "fashion_mnist", None, "test", 16, 1, 4, 10, torch.device("cpu"))


def test_channel_mismatch_names_the_fix() -> None:
    backbone = create_backbone("vit_test", img_size=16, in_chans=3)
    with pytest.raises(ValueError, match="reads 1-channel images but the backbone takes 3; set in_chans=3"):
        extract_dataset_features(backbone, "fashion_mnist", None, "test", 16, 1, 4, 10, torch.device("cpu"))
