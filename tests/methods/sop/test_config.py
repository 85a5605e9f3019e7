"""SOP's config section checks itself at every boundary, naming the key (the loader prefixes ``sop.``)."""

from __future__ import annotations

from typing import Any

import pytest

from sopvit.config import ConfigError
from sopvit.methods.sop.config import SOPConfig, check_head

# a small valid section: banks of 16 / 12 rows
BASE: dict[str, Any] = dict(
    cls_bank_size=16, patch_bank_size=12, cls_anchors=4, cls_k=2, patch_anchors=4, patch_k=0, cls_tasks=1
)


def _error(**changes: Any) -> str | None:
    try:
        SOPConfig(**{**BASE, **changes}).validate()
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"cls_anchors": 16, "cls_k": 0},  # every row an anchor
        {"cls_anchors": 4, "cls_k": 12},  # k = size - anchors
        {"cls_anchors": 3, "cls_keep_fraction": 0.5},  # round(1.5) = 2 kept
        {"cls_keep_fraction": 1.0},
        {"patch_anchors": 12, "patch_k": 0},
        {"patch_anchors": 2, "patch_k": 10},
        {"cls_tasks": 1},
        {"smoothing": 0.0},
        {"smoothing": 0.999},
        {"student_temp": 1e-6},
        {"anchor_selection": "low_cv", "cls_k": 2},  # patch: k = 0 with keep 1 is nothing to select
        {"anchor_selection": "low_cv", "cls_k": 1, "cls_keep_fraction": 1.0},
    ],
)
def test_valid_sections_pass(changes: dict[str, Any]) -> None:
    assert _error(**changes) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cls_bank_size": 0, "cls_anchors": 0}, "cls_bank_size: must be > 0"),
        ({"patch_bank_size": 0, "patch_anchors": 0}, "patch_bank_size: must be > 0"),
        # a one-row memory passes the size check and fails on what its anchors can keep
        (
            {"cls_bank_size": 1, "cls_anchors": 1, "cls_k": 0},
            "cls_anchors: anchors x keep_fraction must keep >= 2",
        ),
        ({"cls_anchors": 0}, "cls_anchors: must be in [1, sop.cls_bank_size=16]"),
        ({"cls_anchors": 17, "cls_k": 0}, "cls_anchors: must be in [1, sop.cls_bank_size=16]"),
        ({"patch_anchors": 0}, "patch_anchors: must be in [1, sop.patch_bank_size=12]"),
        ({"patch_anchors": 13}, "patch_anchors: must be in [1, sop.patch_bank_size=12]"),
        ({"cls_k": 13}, "cls_k: must be < cls_bank_size - cls_anchors"),
        ({"cls_k": -1}, "cls_k: must be < cls_bank_size - cls_anchors"),
        ({"patch_k": 9}, "patch_k: must be < patch_bank_size - patch_anchors"),
        ({"patch_k": -1}, "patch_k: must be < patch_bank_size - patch_anchors"),
        ({"cls_keep_fraction": 0.0}, "cls_keep_fraction: must be in (0, 1]"),
        ({"cls_keep_fraction": 1.001}, "cls_keep_fraction: must be in (0, 1]"),
        ({"patch_keep_fraction": 0.0}, "patch_keep_fraction: must be in (0, 1]"),
        ({"patch_keep_fraction": 1.001}, "patch_keep_fraction: must be in (0, 1]"),
        ({"cls_keep_fraction": 0.25}, "cls_anchors: anchors x keep_fraction must keep >= 2"),
        ({"patch_keep_fraction": 0.25}, "patch_anchors: anchors x keep_fraction must keep >= 2"),
        ({"cls_tasks": 0}, "cls_tasks: must be >= 1"),
        ({"smoothing": 1.0}, "smoothing: must be in [0, 1)"),
        ({"smoothing": -0.001}, "smoothing: must be in [0, 1)"),
        ({"student_temp": 0.0}, "student_temp: must be > 0"),
        ({"anchor_selection": "nearest"}, "anchor_selection: must be uniform or low_cv"),
        (
            {"anchor_selection": "low_cv", "cls_k": 1},
            "cls_k: low_cv anchor selection needs k >= 2 (or sop.cls_keep_fraction=1: nothing to select)",
        ),
        (
            {"anchor_selection": "low_cv", "cls_k": 2, "patch_keep_fraction": 0.5},
            "patch_k: low_cv anchor selection needs k >= 2 (or sop.patch_keep_fraction=1: nothing to select)",
        ),
    ],
)
def test_each_impossible_setting_names_its_key(changes: dict[str, Any], message: str) -> None:
    assert _error(**changes) == message


def test_the_dimension_follows_the_head_unless_it_disagrees() -> None:
    check_head(SOPConfig(), 32)  # None: follows the head
    check_head(SOPConfig(dim=32), 32)
    with pytest.raises(ConfigError) as err:
        check_head(SOPConfig(dim=64), 32)
    assert err.value.key == "sop.dim"
    assert err.value.message == (
        "64 differs from model.head_bottleneck_dim=32 (the head's output width): drop sop.dim, which follows "
        "the head, or set model.head_bottleneck_dim=64"
    )
