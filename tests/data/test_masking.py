"""Block-wise iBOT masks: shape, budget, aspect geometry, probability and determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopvit.data import BlockMaskGenerator


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_and_dtype() -> None:
    gen = BlockMaskGenerator((6, 9), ratio=0.3)
    mask = gen(_seeded(0))
    assert mask.shape == (6, 9) and mask.dtype == torch.bool
    masks = gen.sample(5, _seeded(0))
    assert masks.shape == (5, 6, 9) and masks.dtype == torch.bool
    assert BlockMaskGenerator(7).grid == (7, 7)


@given(
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    ratio=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_never_exceeds_target(h: int, w: int, ratio: float, seed: int) -> None:
    masks = BlockMaskGenerator((h, w), ratio=ratio).sample(8, _seeded(seed))
    assert masks.shape == (8, h, w)
    assert int(masks.flatten(1).sum(1).max()) <= round(ratio * h * w)


@pytest.mark.parametrize(("grid", "ratio"), [((14, 14), 0.3), ((14, 14), 0.5), ((7, 7), 0.3), ((4, 4), 0.5)])
def test_fixed_ratio_hits_target_closely(grid: tuple[int, int], ratio: float) -> None:
    target = round(ratio * grid[0] * grid[1])
    counts = BlockMaskGenerator(grid, ratio=ratio).sample(300, _seeded(1)).flatten(1).sum(1).float()
    assert counts.max() <= target
    assert counts.mean() >= 0.95 * target


def test_ratio_range_is_sampled_per_mask() -> None:
    grid = (14, 14)
    counts = BlockMaskGenerator(grid, ratio=(0.1, 0.5)).sample(400, _seeded(2)).flatten(1).sum(1).float()
    assert counts.max() <= round(0.5 * 196)
    assert counts.min() >= 0.1 * 196 * 0.8
    assert counts.std() > 10  # a fixed ratio would give nearly constant counts
    assert abs(counts.mean().item() - 0.3 * 196) < 0.05 * 196


def test_mask_prob_mixes_empty_masks() -> None:
    masks = BlockMaskGenerator((14, 14), ratio=(0.1, 0.5), mask_prob=0.5).sample(400, _seeded(3))
    empty = (masks.flatten(1).sum(1) == 0).float().mean().item()
    assert 0.4 < empty < 0.6
    assert not BlockMaskGenerator((14, 14), mask_prob=0.0).sample(20, _seeded(3)).any()
    assert not BlockMaskGenerator((14, 14), ratio=0.0).sample(20, _seeded(3)).any()


@pytest.mark.parametrize(("aspect", "shape"), [(1.0, (4, 4)), (0.25, (2, 8)), (4.0, (8, 2))])
def test_block_aspect_geometry(aspect: float, shape: tuple[int, int]) -> None:
    # Area fixed at 16 (min_num_patches = budget) and a fixed aspect make every mask one block.
    gen = BlockMaskGenerator((14, 14), 16 / 196, min_aspect=aspect, max_aspect=aspect, min_num_patches=16)
    for mask in gen.sample(20, _seeded(4)):
        rows, cols = mask.nonzero(as_tuple=True)
        height = int(rows.max() - rows.min()) + 1
        width = int(cols.max() - cols.min()) + 1
        assert (height, width) == shape
        assert int(mask.sum()) == 16


def test_seeded_generator_is_deterministic() -> None:
    gen = BlockMaskGenerator((14, 14), ratio=(0.1, 0.5), mask_prob=0.5)
    assert torch.equal(gen.sample(16, _seeded(7)), gen.sample(16, _seeded(7)))
    assert torch.equal(gen(_seeded(7)), gen(_seeded(7)))
    assert not torch.equal(gen.sample(16, _seeded(7)), gen.sample(16, _seeded(8)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grid": (0, 4)},
        {"grid": (4, 4, 4)},
        {"grid": (4, 4), "ratio": 1.5},
        {"grid": (4, 4), "ratio": (0.5, 0.1)},
        {"grid": (4, 4), "mask_prob": -0.1},
        {"grid": (4, 4), "min_aspect": 0.0},
        {"grid": (4, 4), "min_aspect": 2.0, "max_aspect": 1.0},
        {"grid": (4, 4), "min_num_patches": 0},
    ],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kwargs)
