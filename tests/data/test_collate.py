"""MultiCropCollate on its own and inside a multi-worker DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from sopvit.data import (
    BlockMaskGenerator,
    InMemoryDataset,
    MultiCropCollate,
    MultiCropSpec,
    MultiCropTransform,
    mask_grid,
)


def _sample(i: int, n_crops: int = 4) -> dict[str, object]:
    crops = [torch.full((1, 16, 16), float(i))] * 2 + [torch.full((1, 8, 8), float(i))] * (n_crops - 2)
    return {"image": crops, "index": i, "label": i % 3, "skipped": i % 2}


def test_collate_layout() -> None:
    collate = MultiCropCollate(BlockMaskGenerator(mask_grid(16, 4), ratio=0.3))
    batch = collate([_sample(i) for i in range(5)])
    assert set(batch) == {"crops", "masks", "index", "label", "skipped"}
    assert [tuple(c.shape) for c in batch["crops"]] == [(5, 1, 16, 16)] * 2 + [(5, 1, 8, 8)] * 2
    assert torch.equal(batch["crops"][3][:, 0, 0, 0], torch.arange(5.0))
    assert batch["masks"].shape == (10, 4, 4) and batch["masks"].dtype == torch.bool
    assert torch.equal(batch["masks"].flatten(1).sum(1), torch.full((10,), 5))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and batch["index"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 2, 0, 1]
    assert batch["skipped"] == 2


def test_collate_errors() -> None:
    collate = MultiCropCollate(BlockMaskGenerator((4, 4)))
    with pytest.raises(ValueError, match="crops"):
        collate([_sample(0, 4), _sample(1, 3)])
    with pytest.raises(TypeError, match="MultiCropTransform"):
        collate([{"image": torch.zeros(1, 4, 4), "index": 0}])
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(TypeError, match="BlockMaskGenerator"):
        MultiCropCollate(lambda n: torch.zeros(n, 4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        mask_grid(8, 16)
    assert mask_grid(224, 16) == (14, 14) and mask_grid(28, 4) == (7, 7)


def test_dataloader_workers_end_to_end() -> None:
    spec = MultiCropSpec(global_size=28, local_size=14, n_locals=2, in_chans=1, blur_sigma=(0.1, 1.0))
    images = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8)
    dataset = InMemoryDataset(images, torch.arange(24) % 10, transform=MultiCropTransform(spec))
    masks = BlockMaskGenerator(mask_grid(28, 4), ratio=(0.1, 0.5), mask_prob=0.5)
    loader = DataLoader(dataset, batch_size=6, num_workers=2, collate_fn=MultiCropCollate(masks))
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert [tuple(c.shape) for c in batch["crops"]] == [(6, 1, 28, 28)] * 2 + [(6, 1, 14, 14)] * 2
        assert batch["masks"].shape == (12, 7, 7)
        assert torch.equal(batch["label"], batch["index"] % 10)
    # Workers 0 and 1 produce batches 0 and 1: distinct RNG seeds must give distinct masks.
    assert not torch.equal(batches[0]["masks"], batches[1]["masks"])
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(24))
