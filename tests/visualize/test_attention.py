from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sopvit.data.datasets import build_dataset
from sopvit.visualize import attention_maps, save_attention_figure
from sopvit.visualize.attention import cls_attention, load_run, load_teacher_backbone


def _sample_png(tmp_path: Path) -> Path:
    image = build_dataset("fashion_mnist", None, "train", limit=1)[0]["image"]
    path = tmp_path / "sample.png"
    Image.fromarray(image[0].numpy()).save(path)
    return path


def test_maps_are_the_cls_row_over_patches(trained_run: Path, tmp_path: Path) -> None:
    run = load_run(trained_run)
    backbone = load_teacher_backbone(run)
    image = Image.open(_sample_png(tmp_path))
    size, in_chans = run.config.data.global_size, run.config.data.in_chans
    maps = attention_maps(backbone, image, size, in_chans)
    heads = backbone.model.blocks[-1].attn.num_heads
    gh, gw = backbone.grid_size(size)
    assert maps.shape == (heads, gh, gw)
    assert maps.dtype == torch.float32
    row = cls_attention(backbone, image, size, in_chans)
    # A softmax row over [CLS] + patches: sums to 1 before the [CLS] column is dropped.
    torch.testing.assert_close(row.sum(-1), torch.ones(heads))
    torch.testing.assert_close(maps.flatten(1), row[:, 1:])
    assert bool((maps >= 0).all())
    assert bool((maps.flatten(1).sum(-1) < 1).all())


def test_maps_accept_uint8_tensors(trained_run: Path) -> None:
    run = load_run(trained_run)
    backbone = load_teacher_backbone(run)
    image = build_dataset("fashion_mnist", None, "train", limit=1)[0]["image"]
    maps = attention_maps(backbone, image, 16, 1)
    assert maps.shape[1:] == backbone.grid_size(16)


def test_load_teacher_leaves_global_rng_alone(trained_run: Path) -> None:
    run = load_run(trained_run)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_teacher_backbone(run)
    torch.testing.assert_close(torch.rand(3), expected)


def test_figure_written(trained_run: Path, tmp_path: Path) -> None:
    out = save_attention_figure(trained_run, _sample_png(tmp_path), tmp_path / "figs" / "attn.png")
    assert out == tmp_path / "figs" / "attn.png"
    pixels = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300  # input plus one panel per head
    assert pixels.std() > 10


def test_figure_from_checkpoint_file_at_other_size(trained_run: Path, tmp_path: Path) -> None:
    out = save_attention_figure(trained_run / "checkpoint.pt", _sample_png(tmp_path), tmp_path / "a.png", 32)
    assert out.is_file()


def test_missing_inputs_are_named(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        save_attention_figure(trained_run, tmp_path / "nope.png", tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt"):
        save_attention_figure(tmp_path, _sample_png(tmp_path), tmp_path / "a.png")
