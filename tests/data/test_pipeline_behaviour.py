"""Pre-training inputs pinned: which masks and views an image gets, batch layout, and the config's reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sopvit.data import BatchMultiCrop, MultiCropSpec
from sopvit.data import pipeline as inputs_module
from sopvit.data.config import DataConfig
from sopvit.data.counter_rng import image_keys, uniforms
from sopvit.data.pipeline import (
    PretrainInputs,
    StepPlan,
    _collate,
    _pack_files,
    _PlanSampler,
    _SeededSamples,
    _unpack_files,
)
from sopvit.data.seeding import mix_seed

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
    cfg = DataConfig(**{**FMNIST.__dict__, "augment_on": "device" if batched else "workers"})
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


def test_device_path_augments_each_image_by_seed_epoch_and_image() -> None:
    inputs = _inputs(batched=True)
    m = inputs.plan.steps_per_epoch + 2  # second epoch
    batch = next(inputs.batches(m, m + 1, torch.device("cpu")))
    idx = inputs.plan.indices(m)
    keys = image_keys(3, 1, idx)
    images = inputs.dataset.images[idx]  # type: ignore[attr-defined]
    crops = BatchMultiCrop(inputs.spec)(images, keys)
    assert all(torch.equal(a, b) for a, b in zip(batch.crops, crops))
    count = inputs.masks.uniforms_per_mask
    first, second = (inputs.masks.from_uniforms(uniforms(keys, (1 << 20) + v, count)) for v in (0, 1))
    assert torch.equal(batch.masks, torch.cat([first, second]))
    assert torch.equal(batch.ids, idx) and batch.skipped == 0 and batch.cpu_decoded == 0


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


def test_ranks_take_consecutive_slices_of_the_single_process_global_batch() -> None:
    single = StepPlan(48, batch_size=8, world=1, rank=0, seed=5)
    ranks = [StepPlan(48, batch_size=4, world=2, rank=r, seed=5) for r in (0, 1)]
    for m in (0, 5, 6, 13):  # 6 micro-batches per epoch: the first two epochs and the third
        assert torch.equal(torch.cat([p.indices(m) for p in ranks]), single.indices(m))


def test_each_epoch_is_a_seeded_permutation_whatever_the_first_step() -> None:
    plan = StepPlan(24, batch_size=8, world=1, rank=0, seed=5)
    epochs = [torch.cat([plan.indices(3 * e + p) for p in range(3)]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(24)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    resumed = StepPlan(24, batch_size=8, world=1, rank=0, seed=5)  # a run resumed in epoch 1
    assert torch.equal(resumed.indices(4), epochs[1][8:16])
    other_seed = StepPlan(24, batch_size=8, world=1, rank=0, seed=6)
    assert not torch.equal(other_seed.indices(0), plan.indices(0))


def test_a_data_set_of_exactly_one_global_batch_is_one_step_per_epoch() -> None:
    assert StepPlan(8, batch_size=4, world=2, rank=1, seed=0).steps_per_epoch == 1


def test_per_sample_masks_depend_on_the_seed_epoch_and_image_and_nothing_else() -> None:
    cfg = DataConfig(**{**FMNIST.__dict__, "mask_prob": 1.0, "global_size": 32})  # 8x8 grid, all masked
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=8, world=1, rank=0, seed=3)
    keys = [(0, 0), (0, 1), (1, 0), (2, 7)]
    masks = {k: _SeededSamples(inputs.dataset, inputs.masks, seed=3)[k]["masks"] for k in keys}
    torch.manual_seed(123)  # the global RNG plays no part
    again = _SeededSamples(inputs.dataset, inputs.masks, seed=3)
    for k in keys:
        expected = inputs.masks.sample(2, torch.Generator().manual_seed(mix_seed(3, *k) ^ 1))
        assert torch.equal(masks[k], expected) and torch.equal(again[k]["masks"], masks[k])
    assert len({masks[k].numpy().tobytes() for k in keys}) == len(keys)
    other_seed = _SeededSamples(inputs.dataset, inputs.masks, seed=4)
    assert not torch.equal(other_seed[(0, 0)]["masks"], masks[(0, 0)])


def test_serving_batches_leaves_the_global_rng_alone() -> None:
    # The per-sample loader seeds its workers from its own generator: drawing from the global stream
    # would shift drop path in a resumed run (it restarts the loader) against an uninterrupted one.
    inputs = _inputs(batched=False)
    state = torch.get_rng_state()
    batches = list(inputs.batches(0, 2, torch.device("cpu")))
    assert len(batches) == 2 and torch.equal(torch.get_rng_state(), state)


def test_unpacking_a_workers_packed_files_gives_back_each_files_bytes_index_and_label() -> None:
    items: list[dict[str, Any]] = [
        {"data": torch.tensor([1, 2, 3], dtype=torch.uint8), "index": 7, "label": 2},
        {"data": torch.tensor([9], dtype=torch.uint8), "index": 0, "label": -1},
    ]
    unpacked = _unpack_files(_pack_files(items))
    assert [sorted(u) for u in unpacked] == [["data", "index", "label"]] * 2
    for u, item in zip(unpacked, items, strict=True):
        assert torch.equal(u["data"], item["data"]) and u["index"] == item["index"]
        assert u["label"] == item["label"] and type(u["index"]) is int and type(u["label"]) is int


def test_only_the_per_sample_path_transforms_in_the_data_set() -> None:
    # augment_on=device makes the crops on the device, so its data set serves the stored image as it is.
    raw = _inputs(batched=True).dataset[3]
    assert torch.equal(raw["image"], _inputs(batched=True).dataset.images[3])  # type: ignore[attr-defined]
    crops = _inputs(batched=False).dataset[3]["image"]
    assert isinstance(crops, list) and len(crops) == 5  # 2 global + 3 local views


def _folder(root: Path, n: int) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(12, 10, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.jpg", quality=90)
    return root


class _LoaderSpy:
    """Stands in for the DataLoader the inputs build: records its keyword arguments, then builds the real
    one in-process (the worker count asked for is what is checked)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kwargs: list[dict[str, Any]] = []
        spy = self

        class Loader(DataLoader[Any]):
            def __init__(self, dataset: Any, **kwargs: Any) -> None:
                spy.kwargs.append(dict(kwargs))
                super().__init__(dataset, **{**kwargs, "num_workers": 0})

        monkeypatch.setattr(inputs_module, "DataLoader", Loader)


def test_a_limited_folder_on_the_device_path_reads_its_files_with_the_configured_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(
        dataset="folder",
        path=str(_folder(tmp_path, 6)),
        global_size=16,
        local_size=8,
        n_locals=1,
        augment_on="device",
        num_workers=2,
        limit=4,  # wraps the folder in a Subset: the device path reads the folder underneath
    )
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=2, world=1, rank=0, seed=5)
    assert len(inputs.dataset) == 4  # type: ignore[arg-type]
    spy = _LoaderSpy(monkeypatch)
    state = torch.get_rng_state()
    batches = list(inputs.batches(0, 3, torch.device("cpu")))
    # The loader seeds itself from its own generator, not from the global RNG (which drop path draws).
    assert torch.equal(torch.get_rng_state(), state)
    assert [b.ids.tolist() for b in batches] == [inputs.plan.indices(m).tolist() for m in range(3)]
    assert all(0 <= i < 4 for b in batches for i in b.ids.tolist())
    assert [c.shape for c in batches[0].crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)]
    assert len(spy.kwargs) == 1 and spy.kwargs[0]["num_workers"] == 2
    assert not spy.kwargs[0].get("pin_memory") and not spy.kwargs[0].get("persistent_workers")


def test_the_per_sample_path_uses_the_configured_workers_and_pins_no_memory_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = DataConfig(**{**FMNIST.__dict__, "num_workers": 3})
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=8, world=1, rank=0, seed=3)
    spy = _LoaderSpy(monkeypatch)
    assert len(list(inputs.batches(0, 1, torch.device("cpu")))) == 1
    assert len(spy.kwargs) == 1 and spy.kwargs[0]["num_workers"] == 3
    # Pinned host memory only serves copies to a GPU.
    assert not spy.kwargs[0].get("pin_memory") and not spy.kwargs[0].get("persistent_workers")
