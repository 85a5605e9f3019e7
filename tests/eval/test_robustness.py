from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.eval.robustness import RobustnessConfig, run
from sopvit.models import create_backbone

COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}


def make_in9(root: Path, variants: tuple[str, ...], per_class: int = 8) -> None:
    """IN-9-like tree: a class-coloured centre square on a background that depends on the variant."""
    rng = np.random.default_rng(0)
    for variant in variants:
        splits = ("train", "val") if variant == "original" else ("val",)
        for split in splits:
            for cls, fg in COLOURS.items():
                folder = root / variant / split / cls
                folder.mkdir(parents=True)
                for i in range(per_class):
                    if variant == "mixed_rand":
                        bg = rng.integers(0, 256, 3)
                    else:  # original / mixed_same: a background typical of the class
                        bg = np.array((90, 160, 90) if cls == "cat" else (160, 160, 90))
                    img = np.tile(bg.astype(np.uint8), (16, 16, 1))
                    img[4:12, 4:12] = fg
                    Image.fromarray(img).save(folder / f"{i}.png")


def test_run_reports_every_variant(tmp_path: Path) -> None:
    variants = ("original", "mixed_same", "mixed_rand")
    make_in9(tmp_path, variants)
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16)
    cfg = RobustnessConfig(
        path=str(tmp_path),
        image_size=16,
        variants=variants,
        epochs=20,
        train_batch_size=16,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
    )
    out = run(backbone, cfg)
    assert set(out) == {f"robustness_top1_{v}" for v in variants} | {"robustness_bg_gap"}
    for v in variants:
        assert 0 <= out[f"robustness_top1_{v}"] <= 100
    assert out["robustness_top1_original"] >= 75  # colour-coded classes are linearly separable
    gap = out["robustness_top1_mixed_same"] - out["robustness_top1_mixed_rand"]
    assert out["robustness_bg_gap"] == pytest.approx(gap)
    assert run(backbone, cfg) == out  # second run reads the cached features


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_variant"):
        RobustnessConfig(path=str(tmp_path), variants=("mixed_rand",)).validate()
    with pytest.raises(ValueError, match="variants"):
        run(create_backbone("vit_test", img_size=16), RobustnessConfig(path=str(tmp_path), image_size=16))
