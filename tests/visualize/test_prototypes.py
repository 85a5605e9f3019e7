from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sopvit.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from sopvit.eval.cache import EvalDataConfig, split_features
from sopvit.export.load import teacher_encoder
from sopvit.train.trainer import Trainer
from sopvit.visualize import prototype_gallery
from sopvit.visualize.attention import load_run
from sopvit.visualize.prototypes import (
    CELL_H,
    CELL_W,
    DPI,
    HEADER,
    gallery_layout,
    learned_gallery_layout,
    run_gallery_layout,
)
from tests.train.tiny import tiny_config


def test_supports_are_nearest_valid_neighbours(trained_run: Path) -> None:
    run = load_run(trained_run)
    bank = run.state["objective"]
    embeddings, ids = bank["cls_bank.embeddings"], bank["cls_bank.sample_ids"]
    assert bool((ids >= 0).any()), "the tiny run should fill the memory with real images"
    layout = run_gallery_layout(run, n_prototypes=4, seed=3)
    k = run.config.sop.cls_k
    assert layout.support_ids.shape == (4, k) and layout.grid == (4, k + 1)
    row_of = {int(i): r for r, i in enumerate(ids.tolist()) if i >= 0}
    anchors = {row_of[int(a)] for a in layout.anchor_ids}
    pool = [r for r in row_of.values() if r not in anchors]
    for a, supports, scores in zip(layout.anchor_ids, layout.support_ids, layout.scores, strict=True):
        sims = embeddings[pool] @ embeddings[row_of[int(a)]]
        best = sims.topk(k)
        assert [int(ids[pool[i]]) for i in best.indices] == supports.tolist()
        torch.testing.assert_close(scores, best.values)


def test_noise_rows_are_never_used() -> None:
    gen = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(20, 8, generator=gen), dim=1)
    ids = torch.arange(20)
    ids[10:] = -1
    # Noise rows identical to real ones would be the nearest neighbours if they were not dropped.
    embeddings[10:] = embeddings[:10]
    layout = gallery_layout(embeddings, ids, n_prototypes=3, k=2, seed=1)
    assert bool((layout.anchor_ids >= 0).all()) and bool((layout.support_ids >= 0).all())
    # An anchor's noise twin would score 1; only distinct real rows may appear.
    assert bool((layout.scores < 0.999).all())
    for anchor, supports in zip(layout.anchor_ids, layout.support_ids, strict=True):
        assert int(anchor) not in supports.tolist()


def test_layout_rejects_bad_requests() -> None:
    embeddings = F.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="no rows from real images"):
        gallery_layout(embeddings, torch.full((6,), -1), 2, 1)
    with pytest.raises(ValueError, match="need at least 5"):
        gallery_layout(embeddings, torch.tensor([0, 1, 2, 3, -1, -1]), 3, 2)
    with pytest.raises(ValueError, match="n_prototypes"):
        gallery_layout(embeddings, torch.arange(6), 1, 1)


def test_gallery_png_has_the_grid(trained_run: Path, tmp_path: Path) -> None:
    out = prototype_gallery(trained_run, tmp_path / "g" / "gallery.png", n_prototypes=5, k=3, seed=2)
    assert out.is_file()
    image = Image.open(out)
    # The figure size is fixed per cell, so the PNG size encodes (rows, columns) = (5, 1 + 3).
    assert image.size == (round(4 * CELL_W * DPI), round((5 * CELL_H + HEADER) * DPI))
    assert np.asarray(image.convert("L"), dtype=np.float64).std() > 10


def test_gallery_without_valid_ids_fails_clearly(run_copy: Path, tmp_path: Path) -> None:
    state = load_checkpoint(run_copy / "checkpoint.pt")
    state.pop("format_version")
    state["objective"]["cls_bank.sample_ids"].fill_(-1)
    save_checkpoint(state, run_copy / "checkpoint.pt")
    with pytest.raises(ValueError, match="train longer"):
        prototype_gallery(run_copy, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_gallery_data_path_override_is_checked(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-data"):
        prototype_gallery(trained_run, tmp_path / "g.png", data_path=tmp_path / "missing-data")


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_learned_prototypes_show_their_highest_scoring_images(method: str, tmp_path: Path) -> None:
    run_dir = tmp_path / method
    Trainer(tiny_config(run_dir, f"method={method}", f"{method}.out_dim=16", "train.max_steps=2")).fit()
    run = load_run(run_dir)
    layout = learned_gallery_layout(run, n_prototypes=3, k=4)

    teacher = teacher_encoder(run.state, run.config)
    cfg = EvalDataConfig(dataset="fashion_mnist", image_size=16, in_chans=1, limit=128)
    features, _ = split_features(teacher.backbone, cfg, "train", "cls")
    with torch.no_grad():
        logits = teacher.head(features)  # (128 images, 16 prototypes)
    usage = torch.bincount(logits.argmax(1), minlength=16)
    for row in range(3):
        shown = [int(layout.anchor_ids[row]), *layout.support_ids[row].tolist()]
        # the row's prototype: the one whose 5 best images these are
        matches = [p for p in range(16) if logits[:, p].topk(5).indices.tolist() == shown]
        assert matches, f"row {row} is not the top-5 images of any prototype"
        assert usage[matches[0]] == usage.sort(descending=True).values[row]  # most used first
        torch.testing.assert_close(layout.scores[row], logits[shown[1:], matches[0]])
    out = prototype_gallery(run_dir, tmp_path / "gallery.png", n_prototypes=3, k=4)
    assert Image.open(out).size == (round(5 * CELL_W * DPI), round((3 * CELL_H + HEADER) * DPI))
