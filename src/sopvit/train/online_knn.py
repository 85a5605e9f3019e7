"""k-NN of a backbone on a labelled data set, for online monitoring and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sopvit.data.datasets import InMemoryDataset, build_dataset
from sopvit.data.eval_transforms import EvalTransform
from sopvit.data.transforms import MultiCropSpec
from sopvit.device import autocast_dtype
from sopvit.eval.features import extract_cls_features, tensor_batches
from sopvit.eval.knn import knn_accuracy
from sopvit.recipe.config import PretrainConfig


def _batches(
    dataset: object, size: int, in_chans: int, batch_size: int
) -> tuple[Iterator[torch.Tensor], list[torch.Tensor]]:
    """Image batches, and the list their labels fill in as the batches are consumed.

    Labels come with the images they belong to: reading them up front would decode every file once more,
    and a corrupt file (replaced by the next one) would shift them.
    """
    mean, std = MultiCropSpec(in_chans=in_chans).stats
    if isinstance(dataset, InMemoryDataset):
        return tensor_batches(dataset.images, batch_size, mean, std, size), [dataset.labels]
    ds = cast(Dataset[dict[str, Any]], dataset)
    loader: DataLoader[dict[str, Any]] = DataLoader(ds, batch_size=batch_size, num_workers=2)
    labels: list[torch.Tensor] = []

    def images() -> Iterator[torch.Tensor]:
        for batch in loader:
            labels.append(batch["label"])
            yield batch["image"]

    return images(), labels


def knn_of_backbone(
    backbone: nn.Module, cfg: PretrainConfig, device: torch.device, k: int = 20, batch_size: int = 512
) -> float:
    """Top-1 (%) of the weighted 20-NN classifier: train split -> test split of ``run.knn_dataset``."""
    name = cfg.run.knn_dataset
    if name is None:
        raise ValueError("run.knn_dataset is not set")
    size = cfg.data.global_size
    transform = (
        None
        if name in ("fashion_mnist", "cifar10", "cifar100")
        else EvalTransform(size, in_chans=cfg.data.in_chans)
    )
    feats = []
    for split in ("train", "test"):
        ds = build_dataset(name, cfg.run.knn_path, split, transform=transform, limit=cfg.run.knn_limit)
        batches, labels = _batches(ds, size, cfg.data.in_chans, batch_size)
        # the training run's precision rule, so fp32 training gets fp32 features on a GPU too
        bf16 = autocast_dtype(cfg.train.precision, device) is not None
        features = extract_cls_features(backbone, batches, device, bf16)
        feats.append((features, torch.cat(labels)))
    (train_f, train_y), (test_f, test_y) = feats
    return knn_accuracy(train_f, train_y, test_f, test_y, ks=(k,))[k]
