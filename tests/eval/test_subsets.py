"""Low-shot subset files may name images, as the published ImageNet 1%/10% lists do."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.eval.logreg import LogRegConfig, run
from sopvit.eval.subsets import read_subset_file, split_paths
from sopvit.models import create_backbone


def _imagenet_like(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{cls}_{i}.JPEG")


def test_names_are_matched_to_split_indices(tmp_path: Path) -> None:
    _imagenet_like(tmp_path)
    names = split_paths("imagenet", str(tmp_path), "train", None)
    listing = tmp_path / "1percent.txt"
    listing.write_text("n01443537_2.JPEG\nn01440764_0.JPEG\n")
    idx = read_subset_file(str(listing), 8, names)
    assert sorted(Path(names()[i]).name for i in idx) == ["n01440764_0.JPEG", "n01443537_2.JPEG"]
    listing.write_text("n01440764_0.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(ValueError, match=r"1 of 2 names are not in the split, e.g. \['n09999999_1.JPEG'\]"):
        read_subset_file(str(listing), 8, names)
    # in-memory sets have no file names: the message says to list indices
    with pytest.raises(ValueError, match="integer index"):
        read_subset_file(str(listing), 8, None)
    fmnist = split_paths("fashion_mnist", None, "train", 10)
    with pytest.raises(ValueError, match="no file names; list integer indices"):
        read_subset_file(str(listing), 10, fmnist)


def test_logreg_on_a_named_subset(tmp_path: Path) -> None:
    _imagenet_like(tmp_path / "data")
    listing = tmp_path / "subset.txt"
    listing.write_text("n01440764_1.JPEG\nn01443537_3.JPEG\n")
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=3)
    cfg = LogRegConfig(
        dataset="imagenet",
        path=str(tmp_path / "data"),
        test_split="val",
        image_size=16,
        in_chans=3,
        device="cpu",
        subset_file=str(listing),
    )
    out = run(backbone, cfg)
    assert out["logreg_train_size"] == 2 and 0 <= out["logreg_top1"] <= 100
