"""Pre-training inputs pinned: which masks and views an image gets, batch layout, and the config's reach."""

from __future__ import annotations

import torch

from sopvit.config.pretrain import DataConfig
from sopvit.data import BatchMultiCrop, MultiCropSpec
from sopvit.data.seeding import mix_seed
from sopvit.train.inputs import PretrainInputs, StepPlan, _collate, _PlanSampler, _SeededSamples

FMNIST = DataConfig(
    dataset="fashion_mnist",
    in_chans=1,
    global_size=16,
    local_size=8,
    n_locals=3,
    local_scale=(0.2, 0.6),
    blur_sigma=(0.1, 0.7),
    mask_ratio=(0.2, 0.4),
    mask_prob=0.5,
    num_workers=0,
    limit=64,
)


def _inputs(batched: bool, seed: int = 3) -> PretrainInputs:
    cfg = DataConfig(**{**FMNIST.__dict__, "batched_augment": batched})
    return PretrainInputs(cfg, patch_size=4, batch_size=8, world=1, rank=0, seed=seed)


def test_the_config_reaches_the_crops_and_the_masks() -> None:
    inputs = _inputs(batched=True)
    assert inputs.spec == MultiCropSpec(
        global_size=16,
        local_size=8,
        n_locals=3,
        global_scale=(0.32, 1.0),
        local_scale=(0.2, 0.6),
        in_chans=1,
        blur_sigma=(0.1, 0.7),
    )
    assert inputs.masks.grid == (4, 4) and inputs.masks.ratio == (0.2, 0.4) and inputs.masks.mask_prob == 0.5
    assert len(inputs.dataset) == 64  # type: ignore[arg-type]


def test_batched_micro_batch_is_seeded_by_seed_step_and_rank() -> None:
    inputs = _inputs(batched=True)
    batch = next(inputs.batches(2, 3, torch.device("cpu")))
    idx = inputs.plan.indices(2)
    gen = torch.Generator().manual_seed(mix_seed(3, 2, 0))
    images = inputs.dataset.images[idx]  # type: ignore[attr-defined]
    crops = BatchMultiCrop(inputs.spec)(images, gen)
    masks = inputs.masks.sample(16, gen)
    assert all(torch.equal(a, b) for a, b in zip(batch.crops, crops))
    assert torch.equal(batch.masks, masks) and torch.equal(batch.ids, idx) and batch.skipped == 0


def test_per_sample_masks_are_seeded_by_seed_epoch_and_image() -> None:
    inputs = _inputs(batched=False)
    samples = _SeededSamples(inputs.dataset, inputs.masks, seed=3)
    sample = samples[(1, 5)]
    expected = inputs.masks.sample(2, torch.Generator().manual_seed(mix_seed(3, 1, 5) ^ 1))
    assert torch.equal(sample["masks"], expected)
    assert sample["image"][0].shape == (1, 16, 16) and len(sample["image"]) == 5


def test_collate_puts_every_first_view_mask_before_the_second_views() -> None:
    views = torch.tensor([True, False]).view(2, 1, 1)  # each image: view 1 masked, view 2 not
    samples = [{"image": [torch.zeros(1, 2, 2)], "masks": views, "index": i, "skipped": i} for i in range(2)]
    batch = _collate(samples)
    assert batch.masks.flatten().tolist() == [True, True, False, False]
    assert batch.ids.tolist() == [0, 1] and batch.skipped == 1


def test_plan_sampler_serves_exactly_its_micro_batches() -> None:
    plan = StepPlan(40, batch_size=4, world=1, rank=0, seed=1)  # 10 micro-batches per epoch
    sampler = _PlanSampler(plan, 8, 12)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 4
    assert batches[0] == [(0, int(i)) for i in plan.indices(8)]
    assert batches[3] == [(1, int(i)) for i in plan.indices(11)]
