import math

import numpy as np
import pytest

from sopvit.eval.davis_metrics import boundary_f, jf_mean, region_similarity, seg2bmap


def square(size: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y : y + side, x : x + side] = True
    return m


def test_j_identical_disjoint_empty() -> None:
    a = square(20, 2, 2, 5)
    assert region_similarity(a, a) == 1.0
    assert region_similarity(a, square(20, 12, 12, 5)) == 0.0
    empty = np.zeros((20, 20), dtype=bool)
    assert region_similarity(empty, empty) == 1.0
    assert region_similarity(a, empty) == 0.0


def test_j_shifted_square() -> None:
    # 10x10 squares shifted by 2 columns: overlap 10*8 = 80, union 200 - 80 = 120.
    a, b = square(30, 5, 5, 10), square(30, 5, 7, 10)
    assert region_similarity(a, b) == pytest.approx(80 / 120)


def test_j_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        region_similarity(np.zeros((3, 3)), np.zeros((4, 4)))


def test_seg2bmap_square_outline() -> None:
    b = seg2bmap(square(20, 4, 4, 8))
    assert b.any() and b.sum() < 64  # a thin outline, not the filled square
    assert not b[6:10, 6:10].any()
    assert not seg2bmap(np.zeros((5, 5))).any()


def test_f_identical_disjoint_shifted() -> None:
    a = square(100, 10, 10, 20)
    assert boundary_f(a, a) == 1.0
    assert boundary_f(a, square(100, 70, 70, 20)) == 0.0
    # Tolerance ceil(0.008 * hypot(100, 100)) = 2 pixels: a 1-pixel shift matches every boundary pixel.
    assert math.ceil(0.008 * math.hypot(100, 100)) == 2
    assert boundary_f(a, square(100, 11, 11, 20)) == 1.0
    # Far beyond the tolerance only the crossing points could match: F well below 1.
    assert boundary_f(a, square(100, 10, 20, 20)) < 0.6


def test_f_empty_cases() -> None:
    empty = np.zeros((20, 20), dtype=bool)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(square(20, 2, 2, 5), empty) == 0.0
    assert boundary_f(empty, square(20, 2, 2, 5)) == 0.0


def test_jf_mean_per_object_then_global() -> None:
    m = jf_mean([[1.0, 0.0], [0.5, float("nan")]], [[1.0, 1.0], [0.0]])
    assert m["j_mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["f_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["jf_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        jf_mean([[1.0]], [])
