"""The ``data:`` section checks itself at every boundary, naming the key, and hands its crop fields to
MultiCropSpec unchanged."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sopvit.config import ConfigError
from sopvit.data.config import DataConfig
from sopvit.data.transforms import MultiCropSpec

BASE: dict[str, Any] = dict(dataset="fashion_mnist", global_size=16, local_size=8, in_chans=1)


def _error(**changes: Any) -> str | None:
    try:
        DataConfig(**{**BASE, **changes}).validate()
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"local_size": 16},
        {"mask_ratio": (0.0, 0.0)},
        {"mask_ratio": (1.0, 1.0)},
        {"mask_ratio": (0.1, 0.5)},
        {"mask_prob": 0.0},
        {"mask_prob": 1.0},
        {"num_workers": 0},
        {"limit": None},
        {"limit": 1},
        {"dataset": "folder", "path": "/data"},
        {"dataset": "imagenet", "path": "/data"},
        {"dataset": "cifar10"},
    ],
)
def test_valid_sections_pass(changes: dict[str, Any]) -> None:
    assert _error(**changes) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"in_chans": 2}, "in_chans: must be 1 (grayscale) or 3 (RGB), got 2"),  # MultiCropSpec's own check
        ({"n_locals": -1}, "n_locals: must be >= 0, got -1"),
        ({"local_size": 17}, "local_size: must be <= global_size"),
        ({"mask_ratio": (-0.1, 0.3)}, "mask_ratio: must be an interval within [0, 1], got (-0.1, 0.3)"),
        ({"mask_ratio": (0.5, 0.4)}, "mask_ratio: must be an interval within [0, 1], got (0.5, 0.4)"),
        ({"mask_ratio": (0.5, 1.1)}, "mask_ratio: must be an interval within [0, 1], got (0.5, 1.1)"),
        ({"mask_prob": -0.1}, "mask_prob: must be in [0, 1]"),
        ({"mask_prob": 1.1}, "mask_prob: must be in [0, 1]"),
        ({"num_workers": -1}, "num_workers: must be >= 0"),
        ({"limit": 0}, "limit: must be > 0 or null"),
        (
            {"dataset": "folder"},
            "path: is required for dataset 'folder' (the image folder to pre-train on)",
        ),
        (
            {"dataset": "imagenet"},
            "path: is required for dataset 'imagenet' (the image folder to pre-train on)",
        ),
    ],
)
def test_each_impossible_setting_names_its_key(changes: dict[str, Any], message: str) -> None:
    assert _error(**changes) == message


def test_the_crop_fields_reach_the_multi_crop_spec_unchanged() -> None:
    crop = dict(
        in_chans=3,
        global_size=32,
        local_size=12,
        n_locals=4,
        global_scale=(0.4, 0.9),
        local_scale=(0.1, 0.3),
        blur_sigma=(0.2, 1.5),
    )
    spec = DataConfig(**crop).crop_spec()
    # every field DataConfig shares with MultiCropSpec, and only those; the rest keep iBOT's settings
    assert {f.name for f in dataclasses.fields(DataConfig)} & {
        f.name for f in dataclasses.fields(MultiCropSpec)
    } == set(crop)
    assert spec == MultiCropSpec(**crop)
