import math

import pytest
import torch
import torch.nn.functional as F

from sopvit.eval.knn import KNNConfig, knn_accuracy, run
from sopvit.eval.registry import get_evaluator
from sopvit.models import create_backbone


def test_two_clusters_are_perfect() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.arange(40) % 2
    x = F.normalize(centres[y] + 0.05 * torch.randn(40, 3, generator=gen), dim=-1)
    acc = knn_accuracy(x[:30], y[:30], x[30:], y[30:], ks=(1, 5, 15))
    assert acc == {1: 100.0, 5: 100.0, 15: 100.0}


def test_weighted_vote_by_hand() -> None:
    # query e1; class 0 has one neighbour at cos 1, class 1 two at cos 0.6.
    s = math.sqrt(1 - 0.6**2)
    train = torch.tensor([[1.0, 0.0], [0.6, s], [0.6, -s]])
    labels = torch.tensor([0, 1, 1])
    q, q_label = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # T=1: class 1 gets 2 e^0.6 = 3.64 > e^1 = 2.72; k=1 sees only the class-0 neighbour
    assert knn_accuracy(train, labels, q, q_label, ks=(1, 3), temperature=1.0) == {1: 0.0, 3: 100.0}
    # T=0.07: e^(1/0.07) dwarfs 2 e^(0.6/0.07), the closest neighbour wins
    assert knn_accuracy(train, labels, q, q_label, ks=(3,), temperature=0.07) == {3: 0.0}
    # k larger than the train set uses all of it
    assert knn_accuracy(train, labels, q, q_label, ks=(50,), temperature=1.0) == {50: 100.0}


def test_tie_goes_to_the_lower_class() -> None:
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knn_accuracy(train, labels, q, torch.tensor([0, 1]), ks=(2,)) == {2: 50.0}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ks"):
        KNNConfig(ks=()).validate()
    with pytest.raises(ValueError, match="temperature"):
        KNNConfig(temperature=0.0).validate()
    with pytest.raises(ValueError, match="path"):
        KNNConfig(dataset="imagenet").validate()


def test_run_on_fashion_mnist(tmp_path: object) -> None:
    assert get_evaluator("knn").run is run
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    cfg = KNNConfig(ks=(1, 20), limit=300, batch_size=128, device="cpu", cache_dir=str(tmp_path))
    out = run(backbone, cfg)
    assert set(out) == {"knn_top1@1", "knn_top1@20", "knn_top5@1", "knn_top5@20"}
    assert out["knn_top5@1"] == out["knn_top1@1"]  # one neighbour: one candidate class
    assert out["knn_top5@20"] >= out["knn_top1@20"]
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in out.values())
    assert run(backbone, cfg) == out  # second call from the cache


def test_top5_counts_the_true_class_among_the_five_most_voted() -> None:
    from sopvit.eval.knn import knn_accuracies

    # 7 training images of 7 classes at decreasing similarity to the query (cos 1.0, 0.9, ..., 0.4)
    angles = torch.arange(7) * 0.1
    train = torch.stack([1 - angles, (1 - (1 - angles) ** 2).sqrt()], dim=1)
    labels = torch.arange(7)
    query = torch.tensor([[1.0, 0.0]])
    for truth, expected in ((0, (100.0, 100.0)), (4, (0.0, 100.0)), (5, (0.0, 0.0))):
        got = knn_accuracies(train, labels, query, torch.tensor([truth]), ks=(7,), temperature=0.1)
        assert got == {7: expected}, truth
    # with 3 neighbours only 3 classes are candidates, and an unvoted class never counts
    assert knn_accuracies(train, labels, query, torch.tensor([3]), ks=(3,)) == {3: (0.0, 0.0)}
    assert knn_accuracies(train, labels, query, torch.tensor([2]), ks=(3,)) == {3: (0.0, 100.0)}
