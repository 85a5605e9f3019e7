"""BlockMaskGenerator.from_uniforms: the vectorised block masks match the per-mask loop exactly (given the
same uniforms) and in distribution (against ``sample``), and validate their input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sopvit.data import BlockMaskGenerator
from sopvit.data.masking import default_max_blocks

N_STAT = 20_000


def _uniforms(gen: BlockMaskGenerator, n: int, seed: int) -> torch.Tensor:
    return torch.rand(
        n, gen.uniforms_per_mask, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def _reference(gen: BlockMaskGenerator, u: torch.Tensor) -> torch.Tensor:
    """The loop version's ``_sample_one`` / ``_add_block``, reading ``from_uniforms``' column layout: gate,
    ratio, then 4 columns (area, aspect, top, left) per proposal, ``max_attempts`` proposals per block."""
    height, width = gen.grid
    (lo, hi), (log_lo, log_hi) = gen.ratio, gen._log_aspect
    out = np.zeros((u.shape[0], height, width), dtype=bool)
    for mask, row in zip(out, u.tolist()):
        if not row[0] < gen.mask_prob:
            continue
        ratio = lo if hi == lo else lo + row[1] * (hi - lo)
        target, count = round(ratio * height * width), 0
        for block in range(gen.max_blocks):
            if count >= target:
                break
            budget = target - count
            min_area, delta = min(gen.min_num_patches, budget), 0
            for attempt in range(gen.max_attempts):
                start = 2 + 4 * (block * gen.max_attempts + attempt)
                u_area, u_aspect, u_top, u_left = row[start : start + 4]
                area = min_area + u_area * (budget - min_area)
                aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (0 < h <= height and 0 < w <= width):
                    continue
                top = min(int(u_top * (height - h + 1)), height - h)
                left = min(int(u_left * (width - w + 1)), width - w)
                rect = mask[top : top + h, left : left + w]
                new = h * w - int(rect.sum())
                if 0 < new <= budget:
                    rect[...] = True
                    delta = new
                    break
            if delta == 0:
                break
            count += delta
    return torch.from_numpy(out)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square with ``df`` degrees of freedom at p = 1e-4 (z = 3.719),
    by the Wilson-Hilferty approximation (no scipy in the environment)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _assert_same_histogram(a: torch.Tensor, b: torch.Tensor, min_expected: float = 10.0) -> None:
    """Two-sample chi-square test on integer samples of equal size; sparse bins are pooled."""
    assert a.numel() == b.numel()
    size = int(max(a.max(), b.max())) + 1
    ha = torch.bincount(a.flatten(), minlength=size).double()
    hb = torch.bincount(b.flatten(), minlength=size).double()
    bins_a, bins_b, acc_a, acc_b = [], [], 0.0, 0.0
    for x, y in zip(ha.tolist(), hb.tolist()):
        acc_a, acc_b = acc_a + x, acc_b + y
        if acc_a + acc_b >= 2 * min_expected:
            bins_a.append(acc_a)
            bins_b.append(acc_b)
            acc_a = acc_b = 0.0
    if bins_a:  # the leftover tail joins the last bin
        bins_a[-1], bins_b[-1] = bins_a[-1] + acc_a, bins_b[-1] + acc_b
    if len(bins_a) < 2:
        return
    pa, pb = torch.tensor(bins_a), torch.tensor(bins_b)
    stat = float(((pa - pb) ** 2 / (pa + pb)).sum())
    assert stat < _chi2_critical(len(bins_a) - 1), (stat, len(bins_a), bins_a, bins_b)


def _bounding_box(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Height and width of each mask's bounding box (0 for an empty mask)."""

    def extent(hit: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(hit.shape[1])
        first = torch.where(hit, idx, hit.shape[1]).min(1).values
        last = torch.where(hit, idx, -1).max(1).values
        return (last - first + 1).clamp(min=0)

    return extent(masks.any(2)), extent(masks.any(1))


@pytest.mark.parametrize(
    ("grid", "ratio", "mask_prob", "kwargs"),
    [
        ((14, 14), (0.1, 0.5), 0.5, {}),
        ((14, 14), 0.3, 1.0, {}),
        ((7, 7), (0.1, 0.5), 1.0, {}),
        ((4, 4), 0.3, 0.5, {}),
        ((5, 9), 0.4, 1.0, {"min_num_patches": 2, "max_attempts": 3}),
        ((6, 6), 0.5, 1.0, {"max_blocks": 2}),
    ],
)
def test_matches_the_loop_algorithm_on_the_same_uniforms(
    grid: tuple[int, int], ratio: float | tuple[float, float], mask_prob: float, kwargs: dict[str, int]
) -> None:
    gen = BlockMaskGenerator(grid, ratio=ratio, mask_prob=mask_prob, **kwargs)
    u = _uniforms(gen, 400, seed=11)
    assert torch.equal(gen.from_uniforms(u), _reference(gen, u))


@pytest.mark.parametrize(
    ("grid", "ratio", "mask_prob"),
    [((14, 14), (0.1, 0.5), 0.5), ((7, 7), 0.3, 1.0), ((4, 4), (0.1, 0.5), 1.0)],
)
def test_same_distribution_as_sample(
    grid: tuple[int, int], ratio: float | tuple[float, float], mask_prob: float
) -> None:
    gen = BlockMaskGenerator(grid, ratio=ratio, mask_prob=mask_prob)
    loop = gen.sample(N_STAT, torch.Generator().manual_seed(5))
    vec = gen.from_uniforms(_uniforms(gen, N_STAT, seed=6))
    assert vec.shape == loop.shape and vec.dtype == torch.bool
    counts_loop, counts_vec = loop.flatten(1).sum(1), vec.flatten(1).sum(1)
    _assert_same_histogram(counts_vec, counts_loop)
    assert counts_vec.max() <= round(max(ratio if isinstance(ratio, tuple) else (ratio,)) * gen.num_patches)

    empty_vec = (counts_vec == 0).double().mean().item()
    sigma = math.sqrt(mask_prob * (1 - mask_prob) / N_STAT)
    assert abs(empty_vec - (1 - mask_prob)) <= 5 * sigma + 1e-12
    assert abs(empty_vec - (counts_loop == 0).double().mean().item()) <= 5 * math.sqrt(2) * sigma + 1e-12

    # Per-position masking frequency: every cell within 5 standard errors of the loop's frequency.
    freq_loop, freq_vec = loop.double().mean(0), vec.double().mean(0)
    se = torch.sqrt(2 * freq_loop * (1 - freq_loop) / N_STAT).clamp(min=1e-3)
    assert ((freq_vec - freq_loop).abs() <= 5 * se).all(), (freq_vec - freq_loop).abs().max()

    rows_loop, cols_loop = _bounding_box(loop)
    rows_vec, cols_vec = _bounding_box(vec)
    _assert_same_histogram(rows_vec * (grid[1] + 1) + cols_vec, rows_loop * (grid[1] + 1) + cols_loop)


@pytest.mark.parametrize(
    ("grid", "ratio", "kwargs"),
    [
        ((14, 14), 0.3, {}),
        ((7, 7), 0.5, {}),
        ((4, 4), 0.3, {}),
        # Few attempts make a failed block (and so the permanent stop after it) common.
        ((10, 10), 0.5, {"max_attempts": 2}),
    ],
)
def test_hits_the_target_as_often_as_sample(
    grid: tuple[int, int], ratio: float, kwargs: dict[str, int]
) -> None:
    gen = BlockMaskGenerator(grid, ratio=ratio, **kwargs)
    target = round(ratio * gen.num_patches)
    counts_loop = gen.sample(N_STAT, torch.Generator().manual_seed(7)).flatten(1).sum(1)
    counts_vec = gen.from_uniforms(_uniforms(gen, N_STAT, seed=8)).flatten(1).sum(1)
    assert counts_vec.max() <= target
    hit_loop = (counts_loop == target).double().mean().item()
    hit_vec = (counts_vec == target).double().mean().item()
    assert hit_vec > 0.3
    assert abs(hit_vec - hit_loop) <= 5 * math.sqrt(2 * hit_loop * (1 - hit_loop) / N_STAT) + 1e-12
    _assert_same_histogram(counts_vec, counts_loop)


@pytest.mark.parametrize(("aspect", "shape"), [(0.3, None), (0.25, (2, 8)), (1.0, (4, 4))])
def test_single_block_shapes_match_sample(aspect: float, shape: tuple[int, int] | None) -> None:
    # Area pinned at the 16-patch budget: a mask is one rectangle of random aspect (plus, when rounding
    # leaves the rectangle short, a block filling the remainder), so bounding boxes show block shapes.
    kwargs = {"min_aspect": aspect, "max_aspect": None if shape is None else aspect, "min_num_patches": 16}
    gen = BlockMaskGenerator((14, 14), 16 / 196, **kwargs)  # type: ignore[arg-type]
    n = 5000
    loop = gen.sample(n, torch.Generator().manual_seed(9))
    vec = gen.from_uniforms(_uniforms(gen, n, seed=10))
    rows_vec, cols_vec = _bounding_box(vec)
    if shape is not None:
        assert (rows_vec == shape[0]).all() and (cols_vec == shape[1]).all()
    rows_loop, cols_loop = _bounding_box(loop)
    _assert_same_histogram(rows_vec * 15 + cols_vec, rows_loop * 15 + cols_loop)


@given(
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    ratio=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=40, deadline=None)
def test_never_exceeds_the_per_mask_target(h: int, w: int, ratio: float, seed: int) -> None:
    gen = BlockMaskGenerator((h, w), ratio=(0.0, ratio))
    u = _uniforms(gen, 16, seed)
    targets = torch.round(u[:, 1] * ratio * h * w).long()
    assert (gen.from_uniforms(u).flatten(1).sum(1) <= targets).all()


def test_gate_and_ratio_columns() -> None:
    gen = BlockMaskGenerator((14, 14), ratio=(0.1, 0.5), mask_prob=0.5)
    u = _uniforms(gen, 4, seed=0)
    u[:, 0] = torch.tensor([0.0, 0.4999, 0.5, 0.9999])
    assert gen.from_uniforms(u).flatten(1).any(1).tolist() == [True, True, False, False]
    always = BlockMaskGenerator((14, 14), mask_prob=1.0)
    u = _uniforms(always, 3, seed=0)
    u[:, 0] = 1.0 - 2.0**-53
    assert always.from_uniforms(u).flatten(1).any(1).all()
    assert not BlockMaskGenerator((14, 14), mask_prob=0.0).from_uniforms(u).any()


def test_block_cap_bounds_the_rectangles() -> None:
    gen = BlockMaskGenerator((14, 14), ratio=0.5, max_blocks=1)
    assert gen.uniforms_per_mask == 2 + 1 * 10 * 4
    masks = gen.from_uniforms(_uniforms(gen, 200, seed=3))
    rows, cols = _bounding_box(masks)
    assert torch.equal(masks.flatten(1).sum(1), rows * cols)  # exactly one rectangle each
    assert BlockMaskGenerator(14, max_attempts=3, max_blocks=5).uniforms_per_mask == 2 + 5 * 3 * 4
    with pytest.raises(ValueError, match="max_blocks"):
        BlockMaskGenerator(14, max_blocks=0)


@pytest.mark.parametrize(
    ("grid", "blocks"), [(4, 16), ((7, 14), 16), (14, 16), (16, 21), (28, 21), ((8, 56), 26)]
)
def test_default_block_cap_grows_with_the_grid_side(grid: int | tuple[int, int], blocks: int) -> None:
    gen = BlockMaskGenerator(grid)
    assert gen.max_blocks == default_max_blocks(gen.grid) == blocks
    assert gen.uniforms_per_mask == 2 + blocks * gen.max_attempts * 4


def test_deterministic_and_row_independent() -> None:
    gen = BlockMaskGenerator((14, 14), ratio=(0.1, 0.5), mask_prob=0.5)
    u = _uniforms(gen, 64, seed=1)
    masks = gen.from_uniforms(u)
    assert torch.equal(masks, gen.from_uniforms(u.clone()))
    assert torch.equal(masks, gen.from_uniforms(u.t().contiguous().t()))  # column-major storage
    # A hash RNG keyed per image must give each image the same mask whatever batch it lands in.
    assert torch.equal(masks[10:20], gen.from_uniforms(u[10:20]))
    assert not torch.equal(masks, gen.from_uniforms(_uniforms(gen, 64, seed=2)))


def test_empty_batch() -> None:
    gen = BlockMaskGenerator((6, 9))
    masks = gen.from_uniforms(torch.zeros(0, gen.uniforms_per_mask, dtype=torch.float64))
    assert masks.shape == (0, 6, 9) and masks.dtype == torch.bool


@pytest.mark.parametrize(
    "u",
    [
        torch.rand(4, 642, dtype=torch.float32),
        torch.rand(4, 641, dtype=torch.float64),
        torch.rand(642, dtype=torch.float64),
        torch.rand(2, 4, 642, dtype=torch.float64),
    ],
    ids=["float32", "columns", "1d", "3d"],
)
def test_rejects_malformed_uniforms(u: torch.Tensor) -> None:
    gen = BlockMaskGenerator(14)
    assert gen.uniforms_per_mask == 642
    with pytest.raises(ValueError, match=r"float64 tensor of shape \(n, uniforms_per_mask\) = \(n, 642\)"):
        gen.from_uniforms(u)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_result_lives_on_the_uniforms_device(device: str) -> None:
    gen = BlockMaskGenerator((14, 14), ratio=(0.1, 0.5), mask_prob=0.5)
    u = _uniforms(gen, 32, seed=4)
    masks = gen.from_uniforms(u.to(device))
    assert masks.device.type == device and masks.dtype == torch.bool and masks.shape == (32, 14, 14)
    assert torch.equal(masks.cpu(), gen.from_uniforms(u))
