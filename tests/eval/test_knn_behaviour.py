"""knn_accuracies pinned to its definition: argument checks, its own default temperature, chunked counting,
the dtype of the features, and top-5 counting every voted class however small its vote."""

from __future__ import annotations

import math

import pytest
import torch

from sopvit.eval.knn import knn_accuracies


def _three_neighbours() -> tuple[torch.Tensor, torch.Tensor]:
    # class 0 at cos 1 from e1, class 1 twice at cos 0.6
    s = math.sqrt(1 - 0.6**2)
    return torch.tensor([[1.0, 0.0], [0.6, s], [0.6, -s]]), torch.tensor([0, 1, 1])


def test_default_temperature_is_dinos_0_07() -> None:
    train, labels = _three_neighbours()
    q = torch.tensor([[1.0, 0.0]])
    # at T = 0.07 the closest neighbour outweighs the two others (e^(1/0.07) > 2 e^(0.6/0.07)); not at T ~ 1
    assert knn_accuracies(train, labels, q, torch.tensor([0]), ks=(3,)) == {3: (100.0, 100.0)}
    assert knn_accuracies(train, labels, q, torch.tensor([0]), ks=(3,), temperature=1.07) == {3: (0.0, 100.0)}


def test_every_feature_needs_one_label_and_ks_must_be_positive() -> None:
    train, labels = _three_neighbours()
    q, q_label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match="exactly one label"):  # train side only
        knn_accuracies(train, labels[:2], q, q_label)
    with pytest.raises(ValueError, match="exactly one label"):  # test side only
        knn_accuracies(train, labels, q, torch.tensor([0, 1]))
    for ks in ((0,), (3, 0), ()):
        with pytest.raises(ValueError, match="ks must be positive"):
            knn_accuracies(train, labels, q, q_label, ks=ks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunks_add_up_over_all_test_features(dtype: torch.dtype) -> None:
    """Three 2-d queries scored one per chunk: every chunk's hits count, whatever the feature dtype."""
    train, labels = _three_neighbours()
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], dtype=dtype)
    truth = torch.tensor([1, 0, 1])  # the first query's nearest is class 0: top-1 wrong, top-5 right
    got = knn_accuracies(train.to(dtype), labels, q, truth, ks=(1, 3), temperature=0.07, chunk=1)
    assert got[1] == pytest.approx((200 / 3, 200 / 3))
    assert got[3] == pytest.approx((200 / 3, 100.0))


def test_top5_counts_a_class_whose_vote_is_below_one() -> None:
    train, labels = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 1])
    q = torch.tensor([[1.0, 0.0]])
    # class 1 votes exp(-1 / 0.07) ~ 6e-7: a vote all the same, so it is among the top 5
    assert knn_accuracies(train, labels, q, torch.tensor([1]), ks=(2,)) == {2: (0.0, 100.0)}
