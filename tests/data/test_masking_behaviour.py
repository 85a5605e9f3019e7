"""Block masks pinned to BEiT/iBOT's rules: defaults, limits, exact budgets, uniform block placement."""

from __future__ import annotations

import pytest
import torch

from sopvit.data import BlockMaskGenerator
from sopvit.data.masking import _UniformStream


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_uniform_stream_yields_the_generators_float64_draws_in_order(chunk: int) -> None:
    stream = _UniformStream(_seeded(0), chunk=chunk)
    values = [stream() for _ in range(20)]
    assert values == torch.rand(20, generator=_seeded(0), dtype=torch.float64).tolist()


def test_beit_defaults() -> None:
    gen = BlockMaskGenerator(14, min_aspect=0.3)
    assert gen.min_num_patches == 4 and gen.max_attempts == 10
    assert gen.max_aspect == pytest.approx(1 / 0.3)
    assert repr(gen) == (
        "BlockMaskGenerator(grid=(14, 14), ratio=(0.3, 0.3), mask_prob=1.0, aspect=(0.3, 3.33), "
        "min_num_patches=4)"
    )


def test_limits_of_the_arguments_are_accepted() -> None:
    full = BlockMaskGenerator((4, 4), ratio=1.0, min_aspect=1.0, min_num_patches=1, max_attempts=1)
    assert full.sample(0, _seeded(0)).shape == (0, 4, 4)
    assert full.sample(3, _seeded(0)).any()
    with pytest.raises(ValueError, match="mask_prob"):
        BlockMaskGenerator(4, mask_prob=1.5)


def test_one_by_one_blocks_reach_the_target_exactly() -> None:
    counts = BlockMaskGenerator(14, ratio=0.3, min_num_patches=1).sample(300, _seeded(0)).flatten(1).sum(1)
    assert (counts == round(0.3 * 196)).all()


def test_default_blocks_almost_always_reach_the_target() -> None:
    counts = BlockMaskGenerator(14, ratio=0.5).sample(500, _seeded(0)).flatten(1).sum(1)
    assert (counts == 98).float().mean() > 0.97


def test_a_mask_that_runs_out_of_room_keeps_its_blocks() -> None:
    # 3 x 3 grid, square blocks of at least 4: after a 2 x 2 block the corners may not fit any more
    gen = BlockMaskGenerator((3, 3), ratio=1.0, min_aspect=1.0, max_aspect=1.0)
    counts = gen.sample(200, _seeded(0)).flatten(1).sum(1)
    assert counts.min() >= 4 and (counts < 9).any()
    assert int(gen(_seeded(1)).sum()) >= 4


@pytest.mark.parametrize("grid", [(1, 16), (16, 1)])
def test_one_patch_wide_grids_get_blocks(grid: tuple[int, int]) -> None:
    masks = BlockMaskGenerator(grid, ratio=0.5).sample(50, _seeded(0))
    assert (masks.flatten(1).sum(1) > 0).float().mean() > 0.5


def test_blocks_are_placed_uniformly() -> None:
    # area 16 and aspect 1: every mask is one 4 x 4 block, whose top-left corner is uniform over 11 x 11 cells
    gen = BlockMaskGenerator((14, 14), 16 / 196, min_aspect=1.0, max_aspect=1.0, min_num_patches=16)
    masks = gen.sample(2200, _seeded(4))
    tops = masks.any(dim=2).float().argmax(dim=1)
    lefts = masks.any(dim=1).float().argmax(dim=1)
    for corner in (tops, lefts):
        freq = torch.bincount(corner, minlength=11).float() / len(corner)
        assert freq.shape == (11,)
        assert ((freq - 1 / 11).abs() < 0.3 / 11).all()
