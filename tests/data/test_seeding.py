"""Per-image seeded augmentation: the same views whatever the workers, batch size or order of reading."""

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from sopvit.data.datasets import build_dataset
from sopvit.data.eval_transforms import SupervisedTrainTransform
from sopvit.data.seeding import SeededSamples, mix_seed
from sopvit.eval.finetune import FinetuneConfig, run
from sopvit.models import create_backbone


def _views(workers: int, batch: int, epoch: int) -> torch.Tensor:
    # RandAugment draws from numpy's and Python's RNGs, the crops and flips from torch's
    transform = SupervisedTrainTransform(16, 1, 2, 9, (0.2, 1.0))
    seeded = SeededSamples(build_dataset("fashion_mnist", None, "train", transform=transform, limit=24), 5)
    seeded.set_epoch(epoch)
    loader = DataLoader(seeded, batch_size=batch, num_workers=workers)
    return torch.cat([b["image"] for b in loader])


def test_views_are_a_function_of_seed_epoch_and_image_only() -> None:
    reference = _views(0, 24, epoch=0)
    assert torch.equal(_views(2, 5, epoch=0), reference)
    assert not torch.equal(_views(0, 24, epoch=1), reference)
    transform = SupervisedTrainTransform(16, 1, 2, 9, (0.2, 1.0))
    seeded = SeededSamples(build_dataset("fashion_mnist", None, "train", transform=transform, limit=24), 5)
    backwards = torch.stack([seeded[i]["image"] for i in reversed(range(24))]).flip(0)
    assert torch.equal(backwards, reference)


def test_the_callers_rng_streams_are_untouched() -> None:
    transform = SupervisedTrainTransform(16, 1, 2, 9, (0.2, 1.0))
    seeded = SeededSamples(build_dataset("fashion_mnist", None, "train", transform=transform, limit=4), 5)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    seeded[0], seeded[3]
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


def test_mix_seed_separates_its_inputs() -> None:
    seeds = {mix_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_finetune_result_does_not_depend_on_the_loader_workers() -> None:
    def top1(workers: int) -> float:
        torch.manual_seed(0)
        backbone = create_backbone("vit_test", img_size=16, in_chans=1)
        cfg = FinetuneConfig(
            image_size=16, limit=64, epochs=1, train_batch_size=16, num_workers=workers, device="cpu"
        )
        return run(backbone, cfg)["finetune_top1"]

    assert top1(0) == top1(2)
