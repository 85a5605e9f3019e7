"""`sopvit prototypes assign`: every image goes to its most similar prototype of the run (SOP's memory
anchors, iBOT's learned prototype vectors), and tables it cannot compare are refused in one line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sopvit.cli import main
from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.explore.assign import SEED, assign_prototypes, run_prototypes
from sopvit.explore.embed import EmbedOptions, embed
from sopvit.explore.table import TableMeta, read_embeddings, read_meta, write_part
from sopvit.export.load import load_teacher_encoder
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

N = 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "images"
    root.mkdir()
    images, _ = load_fashion_mnist("test", limit=N)
    for i in range(N):
        Image.fromarray(images[i, 0].numpy()).save(root / f"{i:03d}.png")
    return root


def _run_and_table(
    factory: pytest.TempPathFactory, folder: Path, name: str, *overrides: str
) -> tuple[Path, Path]:
    run = factory.mktemp(name) / "run"
    Trainer(tiny_config(run, "train.max_steps=1", *overrides)).fit()
    table = run.parent / "embeddings.parquet"
    embed(EmbedOptions(str(run), str(folder), str(table), num_workers=0))
    return run, table


@pytest.fixture(scope="module")
def sop(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[Path, Path]:
    return _run_and_table(tmp_path_factory, folder, "sop")


@pytest.fixture(scope="module")
def ibot(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[Path, Path]:
    # another seed: after one step (lr 0 at the warm-up's start) both teachers are still their seed's init
    ibot = ("method=ibot", "ibot.out_dim=64", "ibot.freeze_last_layer=0", "train.seed=1")
    return _run_and_table(tmp_path_factory, folder, "ibot", *ibot)


def _check_argmax(out: Path, table: Path, prototypes: torch.Tensor) -> pd.DataFrame:
    """Counts sum to N and every image sits at its most similar prototype, with that similarity."""
    assigned = pd.read_parquet(out / "assignments.parquet")
    head = read_embeddings(table).head
    assert head is not None and len(assigned) == N
    sims = torch.from_numpy(head) @ prototypes.T
    np.testing.assert_array_equal(assigned["prototype"].to_numpy(), sims.argmax(1).numpy())
    np.testing.assert_allclose(assigned["similarity"].to_numpy(), sims.max(1).values.numpy(), atol=1e-6)
    counts = pd.read_csv(out / "prototypes.csv")
    assert counts["count"].sum() == N and len(counts) == prototypes.shape[0]
    assert (counts["count"] == np.bincount(assigned["prototype"], minlength=len(counts))).all()
    page = (out / "index.html").read_text()
    assert page.count("<section>") == min(3, int((counts["count"] > 0).sum()))
    return counts


def test_sop_images_go_to_the_nearest_memory_anchor(sop: tuple[Path, Path], tmp_path: Path) -> None:
    run, table = sop
    result = assign_prototypes(run, table, tmp_path / "out", top=3, per_prototype=4)
    assert (result.images, result.prototypes, result.method) == (N, 8, "SOP")  # sop.cls_anchors=8
    prototypes, fingerprint = run_prototypes(run)
    assert fingerprint == read_meta(table).fingerprint
    counts = _check_argmax(tmp_path / "out", table, prototypes.vectors)
    # each prototype is a row of the saved memory, named by the sample id stored beside that row
    objective = torch.load(run / "checkpoint.pt", weights_only=False)["objective"]
    memory, ids = objective["cls_bank.embeddings"], objective["cls_bank.sample_ids"]
    rows = (prototypes.vectors @ memory.T).argmax(1)
    torch.testing.assert_close(memory[rows], prototypes.vectors)
    assert counts["anchor_sample_id"].tolist() == ids[rows].tolist() and (ids[rows] >= 0).all()
    # drawn as the loss draws anchors: a prefix of a seeded permutation of the rows of real images
    valid = (ids >= 0).nonzero().flatten()
    drawn = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(SEED))[:8]]
    assert sorted(rows.tolist()) == sorted(drawn.tolist())


def test_ibot_images_go_to_the_teachers_argmax_prototype(ibot: tuple[Path, Path], tmp_path: Path) -> None:
    run, table = ibot
    assert main(["prototypes", "assign", "--checkpoint", str(run), "--embeddings", str(table),
                 "--out", str(tmp_path / "out"), "--top", "3", "--per-prototype", "2"]) == 0  # fmt: skip
    prototypes, _ = run_prototypes(run)
    assert prototypes.vectors.shape == (64, 32) and prototypes.anchor_ids is None
    counts = _check_argmax(tmp_path / "out", table, prototypes.vectors)
    assert list(counts.columns) == ["prototype", "count"]
    # with unit-norm prototypes (norm_last_layer) the cosine's argmax is the teacher's own logits' argmax
    teacher = load_teacher_encoder(run)
    with torch.no_grad():
        z = torch.from_numpy(read_embeddings(table).head)  # the head's normalised bottleneck
        logits = teacher.head.last_layer(z)
    assigned = pd.read_parquet(tmp_path / "out" / "assignments.parquet")
    np.testing.assert_array_equal(assigned["prototype"].to_numpy(), logits.argmax(1).numpy())


def _refusal(capsys: pytest.CaptureFixture[str], run: Path, table: Path, out: Path) -> str:
    capsys.readouterr()
    argv = ["prototypes", "assign", "--checkpoint", str(run), "--embeddings", str(table), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sopvit: error: "), err
    return err


def test_refusals_are_one_line(
    sop: tuple[Path, Path], ibot: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, table = sop
    meta = read_meta(table)
    headless = tmp_path / "headless.parquet"
    headless.mkdir()
    plain = TableMeta(**{**meta.__dict__, "head_dim": None})
    write_part(headless / "part-000-00000.parquet", plain, ["a.png"], np.zeros(1), np.ones((1, meta.dim)))
    err = _refusal(capsys, run, headless, tmp_path / "out")
    assert "no head column" in err and "sopvit embed --checkpoint" in err
    err = _refusal(capsys, run, ibot[1], tmp_path / "out")
    assert read_meta(ibot[1]).fingerprint in err and run_prototypes(run)[1] in err
    assert not (tmp_path / "out").exists()
    assign_prototypes(run, table, tmp_path / "out")
    assert "--overwrite" in _refusal(capsys, run, table, tmp_path / "out")
    with open(tmp_path / "out" / "prototypes.csv") as f:
        assert next(csv.reader(f)) == ["prototype", "count", "anchor_sample_id"]
