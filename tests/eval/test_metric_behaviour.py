"""Evaluation metrics pinned to their definitions: DAVIS J and F, retrieval mAP, copy detection, k-NN."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sopvit.eval.copydays import block_id, copy_detection_map, strong_positives
from sopvit.eval.davis_metrics import (
    boundary_f,
    dilate,
    disk,
    global_means,
    jf_mean,
    object_mean,
    region_similarity,
    seg2bmap,
)
from sopvit.eval.knn import knn_accuracy
from sopvit.eval.retrieval import compute_map


def _random_mask(shape: tuple[int, int], seed: int, p: float = 0.4) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


# ------------------------------------------------------------------------------------------------ DAVIS
def _boundary_by_definition(seg: np.ndarray) -> np.ndarray:
    """A pixel is on the boundary when it differs from its E, S or SE neighbour; the last row compares
    with E only, the last column with S only, and the bottom-right pixel is never on it (DAVIS)."""
    h, w = seg.shape
    out = np.zeros_like(seg)
    for i in range(h):
        for j in range(w):
            if i == h - 1 and j == w - 1:
                continue
            if i == h - 1:
                out[i, j] = seg[i, j] != seg[i, j + 1]
            elif j == w - 1:
                out[i, j] = seg[i, j] != seg[i + 1, j]
            else:
                out[i, j] = (
                    seg[i, j] != seg[i, j + 1] or seg[i, j] != seg[i + 1, j] or seg[i, j] != seg[i + 1, j + 1]
                )
    return out


@pytest.mark.parametrize("seed", range(4))
def test_boundary_map_follows_its_definition(seed: int) -> None:
    seg = _random_mask((9, 7), seed)
    assert np.array_equal(seg2bmap(seg), _boundary_by_definition(seg))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_disk_is_the_set_of_offsets_within_the_radius(radius: int) -> None:
    r = range(-radius, radius + 1)
    expected = np.array([[dy * dy + dx * dx <= radius * radius for dx in r] for dy in r])
    assert np.array_equal(disk(radius), expected)


def test_dilation_by_one_pixel_adds_the_four_neighbours() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2] = True
    expected = np.zeros((5, 5), dtype=bool)
    expected[[1, 2, 2, 2, 3], [2, 1, 2, 3, 2]] = True
    assert np.array_equal(dilate(mask, 1), expected)
    assert np.array_equal(dilate(mask, 0), mask)


def test_void_pixels_are_ignored_by_j() -> None:
    gt = np.zeros((6, 6), dtype=bool)
    gt[1:4, 1:4] = True
    pred = gt.copy()
    pred[4:, 4:] = True  # a false positive ...
    void = np.zeros((6, 6), dtype=bool)
    void[4:, 4:] = True  # ... inside the void region
    assert region_similarity(pred, gt, void) == 1.0
    missed = gt.copy()
    missed[1, 1] = False
    void_miss = np.zeros((6, 6), dtype=bool)
    void_miss[1, 1] = True
    assert region_similarity(missed, gt, void_miss) == 1.0
    assert region_similarity(missed, gt) == pytest.approx(8 / 9)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("pred", lambda m: region_similarity(m, np.zeros((2, 2)))),
        ("gt", lambda m: region_similarity(np.zeros((2, 2)), m)),
        ("void", lambda m: region_similarity(np.zeros((2, 2)), np.zeros((2, 2)), m)),
        ("seg", seg2bmap),
        ("pred", lambda m: boundary_f(m, np.zeros((2, 2)))),
        ("gt", lambda m: boundary_f(np.zeros((2, 2)), m)),
    ],
)
def test_a_mask_that_is_not_2d_is_named(name: str, call: object) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a 2-D mask"):
        call(np.zeros((2, 2, 2)))  # type: ignore[operator]


def test_boundary_tolerance_of_one_or_more_is_a_pixel_radius() -> None:
    a = np.zeros((60, 60), dtype=bool)
    a[10:40, 10:40] = True
    shifted_by_2 = np.roll(a, 2, axis=1)
    # a radius of 1 pixel misses the two shifted vertical edges, a radius of 2 matches them
    assert boundary_f(a, shifted_by_2, bound_th=2) == 1.0
    assert boundary_f(a, shifted_by_2, bound_th=1) < 0.8
    assert boundary_f(a, shifted_by_2, bound_th=1.0) == boundary_f(a, shifted_by_2, bound_th=1)


def test_means_of_objects_without_frames_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(object_mean([]))
        assert object_mean([1.0, math.nan, 0.5]) == 0.75
        m = jf_mean([[1.0], []], [[0.5], []])
    assert m == {"j_mean": 1.0, "f_mean": 0.5, "jf_mean": 0.75}
    assert global_means([0.2, 0.4], [0.0, 1.0]) == pytest.approx(
        {"j_mean": 0.3, "f_mean": 0.5, "jf_mean": 0.4}
    )


# ------------------------------------------------------------------------------------------------ retrieval
def test_compute_map_rejects_rankings_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="ranks must be"):
        compute_map(np.arange(4), [{"ok": [0]}])
    with pytest.raises(ValueError, match="ranks must be"):
        compute_map(np.zeros((4, 2), dtype=np.int64), [{"ok": [0]}])


def test_positives_missing_from_a_truncated_ranking_give_zero_precision() -> None:
    ranks = np.array([[3], [4]])  # the top 2 of a longer ranking; the positives 0 and 1 are not in it
    mean_ap, aps, mpk, n_empty = compute_map(ranks, [{"ok": [0, 1]}], ks=(1, 5))
    assert mean_ap == 0.0 and aps[0] == 0.0 and n_empty == 0
    assert mpk.tolist() == [0.0, 0.0]


def test_all_queries_without_positives_give_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean_ap, aps, mpk, n_empty = compute_map(np.zeros((3, 2), dtype=np.int64), [{"ok": []}, {"ok": []}])
    assert math.isnan(mean_ap) and np.isnan(aps).all() and n_empty == 2
    assert mpk.shape == (3,) and np.isnan(mpk).all()


# ------------------------------------------------------------------------------------------------ copydays
def test_block_is_the_first_four_characters() -> None:
    assert block_id("200001.jpg") == "2000"
    originals = [type("P", (), {"name": n})() for n in ("200000.jpg", "200100.jpg")]
    queries = [type("P", (), {"name": n})() for n in ("200105.jpg", "200002.jpg")]
    assert strong_positives(originals, queries) == [[1], [0]]  # type: ignore[arg-type]


def test_copy_detection_scores_the_20_nearest_by_default() -> None:
    database = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    query = database[:1].clone()
    scores = (database @ query.T).squeeze(1)
    order = torch.argsort(-scores).tolist()
    positive = order[20]  # 21st nearest: outside the default top 20
    assert copy_detection_map(query, database, [[positive]]) == 0.0
    assert copy_detection_map(query, database, [[positive]], top_k=21) == pytest.approx(
        100 / 42
    )  # trapezoid: (0 + 1/21) / 2


def test_copy_detection_ties_keep_the_database_order() -> None:
    database = torch.ones(40, 4)
    query = torch.ones(1, 4)
    # every image ties: stable ranking puts image 30 at rank 31, AP (0 + 1/31) / 2
    assert copy_detection_map(query, database, [[30]], top_k=None) == pytest.approx(100 / 62)


# ------------------------------------------------------------------------------------------------ k-NN
def test_knn_default_temperature_is_dinos_0_07() -> None:
    s = math.sqrt(1 - 0.6**2)
    train = torch.tensor([[1.0, 0.0], [0.6, s], [0.6, -s]])
    labels = torch.tensor([0, 1, 1])
    q, q_label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # at T = 0.07 the closest neighbour outweighs the two others; at T = 1 it would not
    assert knn_accuracy(train, labels, q, q_label, ks=(3,)) == {3: 100.0}
    assert knn_accuracy(train, labels, q, q_label, ks=(3,), temperature=1.0) == {3: 0.0}
