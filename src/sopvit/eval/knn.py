"""Weighted k-NN classification of L2-normalised features (Wu et al. 2018; DINO's protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.inference_mode()
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
    correct = dict.fromkeys(ks, 0)
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start : start + chunk] @ train_features.T
        top_sims, top_idx = sims.topk(k_max, dim=1)
        weights = (top_sims / temperature).exp()
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start : start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sims.shape[0], n_classes, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += int((votes.argmax(1) == truth).sum())
    return {k: 100.0 * c / test_features.shape[0] for k, c in correct.items()}
