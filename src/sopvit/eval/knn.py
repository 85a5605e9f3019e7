"""Weighted k-NN classification of L2-normalised features (Wu et al. 2018; DINO's protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sopvit.config import check
from sopvit.device import resolve_device
from sopvit.eval.cache import EvalDataConfig, split_features
from sopvit.eval.registry import register
from sopvit.models import Backbone


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (%) for each k: the k most similar training features vote with exp(cos / T).

    train_features: (N, D), test_features: (M, D), both unit-norm; labels: (N,), (M,) int64 in [0, C).
    """
    both = knn_accuracies(train_features, train_labels, test_features, test_labels, ks, temperature, chunk)
    return {k: top1 for k, (top1, _) in both.items()}


@torch.inference_mode()
def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, tuple[float, float]]:
    """``{k: (top-1 %, top-5 %)}`` of the weighted k-NN vote (shapes as :func:`knn_accuracy`).

    Top-5 counts a test image as right when its class is among the 5 classes with the most vote (DINO's
    ``eval_knn.py``; with k < 5 neighbours, among the k best) and got a vote at all.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]}, test features {test_features.shape[1]}"
        )
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("every feature needs exactly one label")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {list(ks)}")
    if train_labels.min() < 0:
        raise ValueError("k-NN needs labelled training data (found label < 0)")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), train_features.shape[0])
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start : start + chunk] @ train_features.T
        top_sims, top_idx = sims.topk(k_max, dim=1)
        weights = (top_sims / temperature).exp()
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start : start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sims.shape[0], n_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k][0] += int((votes.argmax(1) == truth).sum())  # ties: the lower class
            top_votes, ranked = votes.topk(min(5, kk, n_classes), dim=1)
            # a class no neighbour voted for never counts, whatever order topk leaves the zeros in
            correct[k][1] += int(((ranked == truth[:, None]) & (top_votes > 0)).any(dim=1).sum())
    n = test_features.shape[0]
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}


@dataclass
class KNNConfig(EvalDataConfig):
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07

    def validate(self) -> None:
        super().validate()
        check(len(self.ks) > 0 and min(self.ks) >= 1, "ks", "must be a non-empty list of positive ints")
        check(self.temperature > 0, "temperature", "must be > 0")


@register("knn", KNNConfig, "weighted k-NN on the final-normed [CLS], L2-normalised (DINO)")
def run(backbone: Backbone, cfg: KNNConfig) -> dict[str, float]:
    cfg.validate()
    train_f, train_y = split_features(backbone, cfg, cfg.train_split, "cls")
    test_f, test_y = split_features(backbone, cfg, cfg.test_split, "cls")
    device = resolve_device(cfg.device)
    # similarity matmuls on the accelerator: N_test x N_train is the whole cost of the protocol
    acc = knn_accuracies(
        F.normalize(train_f, dim=-1).to(device),
        train_y.to(device),
        F.normalize(test_f, dim=-1).to(device),
        test_y.to(device),
        ks=cfg.ks,
        temperature=cfg.temperature,
    )
    top1 = {f"knn_top1@{k}": v for k, (v, _) in acc.items()}
    return {**top1, **{f"knn_top5@{k}": v for k, (_, v) in acc.items()}}
