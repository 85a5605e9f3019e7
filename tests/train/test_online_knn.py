"""Online k-NN on an image folder: every file is decoded once, and labels travel with their images."""

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import sopvit.data.image_folder as image_folder
from sopvit.models import create_backbone
from sopvit.train.online_knn import knn_of_backbone
from tests.train.tiny import tiny_config


def _imagenet_layout(root: Path, per_class: int = 6) -> None:
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label, level in enumerate((40, 210)):  # dark and bright classes: k-NN separates them
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = torch.randint(-20, 20, (16, 16), generator=gen)
                pixels = (level + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{i}.png")


def test_folder_knn_decodes_each_image_once_and_keeps_labels_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _imagenet_layout(tmp_path)
    decodes = multiprocessing.get_context("fork").Value("i", 0)  # shared with forked loader workers
    real = image_folder.decode_image

    def counting(path: str, mode: str) -> Any:
        with decodes.get_lock():
            decodes.value += 1
        return real(path, mode)

    monkeypatch.setattr(image_folder, "decode_image", counting)
    cfg = tiny_config(
        tmp_path / "run", "run.knn_dataset=imagenet", f"run.knn_path={tmp_path}", "data.in_chans=3"
    )
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", 16, 3, 0.0)
    acc = knn_of_backbone(backbone, cfg, torch.device("cpu"), k=3)
    assert decodes.value == 24  # 12 train + 12 test images, once each
    assert acc == 100.0  # labels in the order of the features: brightness alone separates the classes
